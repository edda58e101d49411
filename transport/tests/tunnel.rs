//! The job tunnel (`horde/job/1`) end to end on 127.0.0.1: a real job endpoint, real tokio TCP
//! jobs, and clients that verify receipts.

// Helpers outside `#[test]` functions are not covered by clippy's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use horde_protocol::codec::MAX_FRAME_LEN;
use horde_protocol::records::ClientStreamSignature;
use horde_protocol::{JobId, JobReceipt, SecretKey, Signature, Signed, TunnelFrame};
use horde_transport::test_utils::{echo_job, localhost_endpoint, seeded_key};
use horde_transport::tunnel::{
    DATA_CHUNK, JobEndpointHandle, JobTunnel, TunnelContext, TunnelError, TunnelStream,
    forward_tcp, http_request, serve_job_endpoint, serve_tunnel_stream,
};
use horde_transport::{
    ALPN_JOB, ClientPolicy, ConnectError, EndpointConfig, HordeEndpoint, codes, split,
};
use quinn::VarInt;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const JOB_ID: JobId = JobId([0x42; 16]);

fn client_key() -> SecretKey {
    seeded_key(10)
}

fn job_key() -> SecretKey {
    seeded_key(11)
}

fn localhost() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A job endpoint as the executor binds it: certificate = job key, only the client key admitted.
fn job_endpoint() -> HordeEndpoint {
    let config = EndpointConfig::new(localhost(), &[ALPN_JOB])
        .with_client_policy(ClientPolicy::Only(client_key().hotkey()));
    HordeEndpoint::bind(&job_key(), config).unwrap()
}

fn context(target: SocketAddr) -> TunnelContext {
    TunnelContext {
        job_id: JOB_ID,
        job_key: job_key(),
        client_key: client_key().hotkey(),
        target: Arc::new(target),
    }
}

/// A tiny HTTP job: reads one request (head + Content-Length body), answers, closes.
/// `/chunked` answers chunked, `/eof` answers HTTP/1.0 delimited by the close, anything else
/// echoes the body with a Content-Length.
async fn http_job() -> SocketAddr {
    let listener = TcpListener::bind(localhost()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut input = Vec::new();
                let head_end = loop {
                    let mut buffer = [0u8; 4096];
                    let read = tcp.read(&mut buffer).await.unwrap();
                    assert!(read > 0, "request ended early");
                    input.extend_from_slice(&buffer[..read]);
                    if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end + 4;
                    }
                };
                let head = String::from_utf8_lossy(&input[..head_end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                while input.len() < head_end + length {
                    let mut buffer = [0u8; 4096];
                    let read = tcp.read(&mut buffer).await.unwrap();
                    assert!(read > 0, "body ended early");
                    input.extend_from_slice(&buffer[..read]);
                }
                let body = &input[head_end..head_end + length];
                let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                let response = match path.as_str() {
                    "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                        3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
                        .to_vec(),
                    "/eof" => b"HTTP/1.0 200 OK\r\n\r\nuntil the close".to_vec(),
                    _ => {
                        let mut response = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Path: {path}\r\n\
                             Connection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        response.extend_from_slice(body);
                        response
                    }
                };
                tcp.write_all(&response).await.unwrap();
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

struct Setup {
    handle: JobEndpointHandle,
    _client_endpoint: HordeEndpoint,
    connection: quinn::Connection,
}

/// A job endpoint serving `target` and a client connected to it with the spec's client key.
async fn setup(target: SocketAddr) -> Setup {
    let server = job_endpoint();
    let addr = server.local_addr().unwrap();
    let handle = serve_job_endpoint(server, Arc::new(context(target)), CancellationToken::new());
    let client_endpoint = localhost_endpoint(&client_key());
    let connection = client_endpoint
        .connect(addr, &job_key().hotkey(), ALPN_JOB)
        .await
        .unwrap();
    Setup {
        handle,
        _client_endpoint: client_endpoint,
        connection,
    }
}

fn job_tunnel(connection: &quinn::Connection) -> JobTunnel {
    JobTunnel::new(connection.clone(), JOB_ID, client_key(), job_key().hotkey()).unwrap()
}

async fn open(connection: &quinn::Connection) -> TunnelStream {
    job_tunnel(connection).open().await.unwrap()
}

async fn read_to_end(tunnel: &mut TunnelStream) -> Result<Vec<u8>, TunnelError> {
    let mut out = Vec::new();
    while let Some(bytes) = tunnel.read().await? {
        assert!(!bytes.is_empty());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[tokio::test]
async fn round_trip_with_a_verified_receipt() {
    let setup = setup(echo_job().await).await;
    let mut tunnel = open(&setup.connection).await;
    let stream = tunnel.id();
    tunnel.write(b"hello ").await.unwrap();
    tunnel.write(b"job").await.unwrap();
    tunnel.finish_sending().await.unwrap();
    assert!(matches!(
        tunnel.write(b"late").await,
        Err(TunnelError::Finished)
    ));
    assert_eq!(read_to_end(&mut tunnel).await.unwrap(), b"hello job");
    // Reading after the end stays at the end.
    assert!(tunnel.read().await.unwrap().is_none());

    let receipt = tunnel.receipt().unwrap().clone();
    let verified = receipt.verify_by(&job_key().hotkey()).unwrap();
    assert_eq!(
        verified,
        JobReceipt {
            job_id: JOB_ID,
            stream,
            digest_in: digest(b"hello job"),
            digest_out: digest(b"hello job"),
            bytes_in: 9,
            bytes_out: 9,
        }
    );
    // The executor side logged the same receipt.
    assert_eq!(setup.handle.receipts_at_least(1).await, vec![receipt]);
    assert_eq!(setup.handle.stream_counts(), (1, 0));
    setup.handle.shutdown().await;
}

/// A job that reads its input to the end, then writes `reply` and closes at once: its last
/// bytes and its EOF reach the executor together.
async fn reply_then_close_job(reply: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind(localhost()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let reply = Arc::clone(&reply);
            tokio::spawn(async move {
                let mut input = Vec::new();
                let _ = tcp.read_to_end(&mut input).await;
                let _ = tcp.write_all(&reply).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_reply_that_comes_with_its_eof_arrives_whole_before_its_receipt() {
    // The executor keeps such last bytes for the receipt's write: small and large replies, on
    // both sides of one Data frame.
    for len in [1, 1000, DATA_CHUNK - 1, DATA_CHUNK + 1, 600_000] {
        let reply = noise(len, len as u64);
        let setup = setup(reply_then_close_job(reply.clone()).await).await;
        let mut tunnel = open(&setup.connection).await;
        let stream = tunnel.id();
        tunnel.write(b"request").await.unwrap();
        tunnel.finish_sending().await.unwrap();
        let received = read_to_end(&mut tunnel).await.unwrap();
        assert!(received == reply, "{len}: the reply differs");
        let receipt = tunnel
            .receipt()
            .unwrap()
            .verify_by(&job_key().hotkey())
            .unwrap();
        assert_eq!(
            receipt,
            JobReceipt {
                job_id: JOB_ID,
                stream,
                digest_in: digest(b"request"),
                digest_out: digest(&reply),
                bytes_in: 7,
                bytes_out: len as u64,
            },
            "{len}"
        );
        setup.handle.shutdown().await;
    }
}

#[tokio::test]
async fn last_bytes_and_client_end_in_one_write() {
    let setup = setup(echo_job().await).await;
    let mut tunnel = open(&setup.connection).await;
    tunnel.write(b"first ").await.unwrap();
    tunnel
        .write_last(bytes::Bytes::from_static(b"and last"))
        .await
        .unwrap();
    assert!(matches!(
        tunnel.write(b"late").await,
        Err(TunnelError::Finished)
    ));
    assert!(matches!(
        tunnel.finish_sending().await,
        Err(TunnelError::Finished)
    ));
    assert_eq!(read_to_end(&mut tunnel).await.unwrap(), b"first and last");
    let receipt = tunnel
        .receipt()
        .unwrap()
        .verify_by(&job_key().hotkey())
        .unwrap();
    assert_eq!(receipt.digest_in, digest(b"first and last"));
    assert_eq!(receipt.bytes_in, 14);
    setup.handle.shutdown().await;
}

#[tokio::test]
async fn full_duplex_exchange_before_finishing() {
    // Like a WebSocket session: several request/answer turns on one stream, then the end.
    let setup = setup(echo_job().await).await;
    let mut tunnel = open(&setup.connection).await;
    let mut all = Vec::new();
    for turn in 0..5 {
        let message = format!("message {turn}");
        tunnel.write(message.as_bytes()).await.unwrap();
        all.extend_from_slice(message.as_bytes());
        let mut echoed = Vec::new();
        while echoed.len() < message.len() {
            echoed.extend_from_slice(&tunnel.read().await.unwrap().unwrap());
        }
        assert_eq!(echoed, message.as_bytes());
    }
    tunnel.finish_sending().await.unwrap();
    assert!(read_to_end(&mut tunnel).await.unwrap().is_empty());
    let receipt = tunnel
        .receipt()
        .unwrap()
        .verify_by(&job_key().hotkey())
        .unwrap();
    assert_eq!(receipt.digest_in, digest(&all));
    assert_eq!(receipt.digest_out, digest(&all));
}

#[tokio::test]
async fn transfer_of_32_mib_both_ways() {
    const LEN: usize = 32 * 1024 * 1024;
    let setup = setup(echo_job().await).await;
    let (mut writer, mut reader) = open(&setup.connection).await.into_split();
    let data = noise(LEN, 7);
    let expected = digest(&data);
    let sender = tokio::spawn(async move {
        for piece in data.chunks(1024 * 1024 + 17) {
            writer.write(piece).await.unwrap();
        }
        writer.finish_sending().await.unwrap();
    });
    let mut hasher = blake3::Hasher::new();
    let mut received = 0usize;
    while let Some(bytes) = reader.read().await.unwrap() {
        hasher.update(&bytes);
        received += bytes.len();
    }
    sender.await.unwrap();
    assert_eq!(received, LEN);
    assert_eq!(*hasher.finalize().as_bytes(), expected);
    let receipt = reader
        .receipt()
        .unwrap()
        .verify_by(&job_key().hotkey())
        .unwrap();
    assert_eq!(
        (receipt.bytes_in, receipt.bytes_out),
        (LEN as u64, LEN as u64)
    );
    assert_eq!(
        (receipt.digest_in, receipt.digest_out),
        (expected, expected)
    );
}

#[tokio::test]
async fn twenty_concurrent_streams_on_one_connection() {
    let setup = setup(echo_job().await).await;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..20u64 {
        let connection = setup.connection.clone();
        tasks.spawn(async move {
            let payload = noise(100_000 + index as usize * 1000, index);
            let (mut writer, mut reader) = open(&connection).await.into_split();
            let sent = payload.clone();
            let send = tokio::spawn(async move {
                writer.write(&sent).await.unwrap();
                writer.finish_sending().await.unwrap();
            });
            let mut echoed = Vec::new();
            while let Some(bytes) = reader.read().await.unwrap() {
                echoed.extend_from_slice(&bytes);
            }
            send.await.unwrap();
            assert_eq!(echoed, payload);
            let receipt = reader.receipt().unwrap().verify().unwrap();
            assert_eq!(receipt.stream, reader.id());
            receipt.stream
        });
    }
    let mut streams = Vec::new();
    while let Some(stream) = tasks.join_next().await {
        streams.push(stream.unwrap());
    }
    streams.sort_unstable();
    streams.dedup();
    assert_eq!(streams.len(), 20, "every stream has its own id");
}

#[tokio::test]
async fn http_request_through_the_tunnel() {
    let setup = setup(http_job().await).await;
    let run = |method: &'static str, path: &'static str, body: &'static [u8]| {
        let tunnel = job_tunnel(&setup.connection);
        async move { http_request(&tunnel, method, path, body).await.unwrap() }
    };
    let response = run("POST", "/echo", b"some body").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"some body");
    assert_eq!(response.header("x-path"), Some("/echo"));
    let receipt = response.receipt.verify_by(&job_key().hotkey()).unwrap();
    assert_eq!(receipt.job_id, JOB_ID);

    let response = run("GET", "/chunked", b"").await;
    assert_eq!(response.body, b"abcdefg");
    let response = run("GET", "/eof", b"").await;
    assert_eq!(response.body, b"until the close");

    let error = http_request(&job_tunnel(&setup.connection), "GET", "/a b", b"")
        .await
        .unwrap_err();
    assert!(matches!(error, TunnelError::Http(_)), "{error:?}");
}

#[tokio::test]
async fn forward_tcp_serves_plain_tcp_clients_with_receipts() {
    let setup = setup(http_job().await).await;
    let listener = TcpListener::bind(localhost()).await.unwrap();
    let local = listener.local_addr().unwrap();
    let (receipts_tx, mut receipts) = tokio::sync::mpsc::channel(8);
    let forwarder = tokio::spawn(forward_tcp(
        listener,
        job_tunnel(&setup.connection),
        receipts_tx,
    ));

    // A client that half-closes after its request (like `curl` with a body).
    let request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nping";
    let mut tcp = TcpStream::connect(local).await.unwrap();
    tcp.write_all(request).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nping"), "{response}");
    let receipt = tokio::time::timeout(Duration::from_secs(5), receipts.recv())
        .await
        .unwrap()
        .unwrap()
        .verify_by(&job_key().hotkey())
        .unwrap();
    assert_eq!(receipt.digest_in, digest(request));
    assert_eq!(receipt.bytes_out as usize, response.len());

    // A client that never half-closes and reads a response delimited by the job's close: the
    // job's EOF reaches it through the output-ended marker, and the receipt follows its close.
    let request = b"GET /eof HTTP/1.0\r\n\r\n";
    let mut tcp = TcpStream::connect(local).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut response))
        .await
        .expect("the job's close reaches the local client")
        .unwrap();
    assert!(response.ends_with(b"until the close"));
    drop(tcp);
    let receipt = tokio::time::timeout(Duration::from_secs(3), receipts.recv())
        .await
        .expect("the receipt arrives without waiting for the grace period")
        .unwrap()
        .verify()
        .unwrap();
    assert_eq!(receipt.digest_in, digest(request));

    // A std (blocking) client works as well.
    let response = tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let mut tcp = std::net::TcpStream::connect(local).unwrap();
        tcp.write_all(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).unwrap();
        response
    })
    .await
    .unwrap();
    assert!(response.ends_with(b"0\r\n\r\n"));
    assert!(receipts.recv().await.is_some());

    // Closing the QUIC connection ends the forwarder with a typed error.
    setup.connection.close(codes::SHUTDOWN, b"done");
    let result = tokio::time::timeout(Duration::from_secs(5), forwarder)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(result, Err(TunnelError::Connection(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_client_key_other_than_the_specs_is_refused_at_tls() {
    let setup = setup(echo_job().await).await;
    let addr = setup.handle.local_addr().unwrap();
    let stranger = localhost_endpoint(&seeded_key(12));
    let refusal = match stranger.connect(addr, &job_key().hotkey(), ALPN_JOB).await {
        Err(error) => error,
        Ok(connection) => {
            // TLS 1.3: the client may finish before the server refuses its certificate.
            let tunnel = JobTunnel::new(
                connection.clone(),
                JOB_ID,
                seeded_key(12),
                job_key().hotkey(),
            )
            .unwrap();
            if let Ok(mut tunnel) = tunnel.open().await {
                let _ = tunnel.write(b"x").await;
                assert!(tunnel.read().await.is_err());
            }
            let error = tokio::time::timeout(Duration::from_secs(5), connection.closed())
                .await
                .unwrap();
            ConnectError::from_connection_error(error)
        }
    };
    assert!(
        matches!(refusal, ConnectError::TlsRejectedByPeer { .. }),
        "{refusal:?}"
    );
    assert!(setup.handle.receipts().is_empty());
}

#[tokio::test]
async fn opening_a_stream_to_an_unpinned_key_is_refused() {
    let setup = setup(echo_job().await).await;
    let error = JobTunnel::new(
        setup.connection.clone(),
        JOB_ID,
        client_key(),
        seeded_key(13).hotkey(),
    )
    .unwrap_err();
    assert!(
        matches!(error, TunnelError::WrongJobKey { .. }),
        "{error:?}"
    );
}

/// How a fake job endpoint ends its stream.
#[derive(Clone, Copy, Debug)]
enum FakeEnd {
    SignedByAnotherKey,
    WrongDigestOut,
    WrongStream,
    TamperedBytes,
    NoReceipt,
}

#[tokio::test]
async fn bad_receipts_are_refused() {
    for end in [
        FakeEnd::SignedByAnotherKey,
        FakeEnd::WrongDigestOut,
        FakeEnd::WrongStream,
        FakeEnd::TamperedBytes,
        FakeEnd::NoReceipt,
    ] {
        let server = job_endpoint();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(fake_job(server, end));
        let client_endpoint = localhost_endpoint(&client_key());
        let connection = client_endpoint
            .connect(addr, &job_key().hotkey(), ALPN_JOB)
            .await
            .unwrap();
        let mut tunnel = open(&connection).await;
        tunnel.write(b"request").await.unwrap();
        tunnel.finish_sending().await.unwrap();
        let error = read_to_end(&mut tunnel).await.unwrap_err();
        match end {
            FakeEnd::NoReceipt => {
                assert!(matches!(error, TunnelError::MissingReceipt), "{error:?}")
            }
            _ => assert!(
                matches!(error, TunnelError::BadReceipt(_)),
                "{end:?}: {error:?}"
            ),
        }
        assert!(tunnel.receipt().is_none());
        connection.close(codes::SHUTDOWN, b"");
        task.await.unwrap();
    }
}

/// A fake job endpoint (job key, real TLS) that answers "x" and then ends as told.
async fn fake_job(server: HordeEndpoint, end: FakeEnd) {
    let connection = server.accept().await.unwrap().unwrap().connection;
    let (send, recv) = connection.accept_bi().await.unwrap();
    let stream = u64::from(recv.id());
    let (mut send, mut recv) = split(send, recv);
    let mut received = Vec::new();
    loop {
        match recv.recv::<TunnelFrame>().await.unwrap() {
            Some(TunnelFrame::Data(bytes)) => received.extend_from_slice(&bytes),
            Some(TunnelFrame::ClientEnd(_)) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    send.send(&TunnelFrame::Data(b"x".to_vec())).await.unwrap();
    let mut receipt = JobReceipt {
        job_id: JOB_ID,
        stream,
        digest_in: digest(&received),
        digest_out: digest(b"x"),
        bytes_in: received.len() as u64,
        bytes_out: 1,
    };
    let mut key = job_key();
    match end {
        FakeEnd::SignedByAnotherKey => key = seeded_key(14),
        FakeEnd::WrongDigestOut => receipt.digest_out = digest(b"y"),
        FakeEnd::WrongStream => receipt.stream += 4,
        FakeEnd::TamperedBytes | FakeEnd::NoReceipt => {}
    }
    let mut signed = Signed::sign(&key, &receipt);
    if let FakeEnd::TamperedBytes = end {
        let mut bytes = signed.bytes().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        signed = Signed::from_parts(bytes, *signed.signer(), *signed.signature());
    }
    if !matches!(end, FakeEnd::NoReceipt) {
        send.send(&TunnelFrame::JobEnd(signed)).await.unwrap();
    }
    send.finish().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
}

type ServerResult = Result<horde_transport::tunnel::TunnelStats, TunnelError>;

/// A raw client on a real job endpoint whose server side runs [`serve_tunnel_stream`] directly,
/// so the test sees the server's typed result. `write` sends what it likes on the stream (its
/// id given); returns the server's result and how the client's read side ended.
async fn raw_stream_exchange<W, Fut>(write: W) -> (ServerResult, quinn::ReadError)
where
    W: FnOnce(quinn::SendStream, u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let server = job_endpoint();
    let addr = server.local_addr().unwrap();
    let target = echo_job().await;
    let serve = tokio::spawn(async move {
        let connection = server.accept().await.unwrap().unwrap().connection;
        let (send, recv) = connection.accept_bi().await.unwrap();
        let result = serve_tunnel_stream(send, recv, &context(target)).await;
        // Keep the connection until the client has seen the reset.
        let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
        result
    });
    let client_endpoint = localhost_endpoint(&client_key());
    let connection = client_endpoint
        .connect(addr, &job_key().hotkey(), ALPN_JOB)
        .await
        .unwrap();
    let (send, mut recv_raw) = connection.open_bi().await.unwrap();
    let stream = u64::from(send.id());
    write(send, stream).await;
    let read_error = loop {
        match recv_raw.read_chunk(usize::MAX, true).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream finished instead of being reset"),
            Err(error) => break error,
        }
    };
    connection.close(codes::SHUTDOWN, b"");
    (serve.await.unwrap(), read_error)
}

/// [`raw_stream_exchange`] sending `frames`, then finishing.
async fn raw_exchange(frames: Vec<TunnelFrame>) -> (ServerResult, quinn::ReadError) {
    raw_stream_exchange(|send, stream| async move {
        let mut send = horde_transport::FramedSend::new(send, MAX_FRAME_LEN);
        for frame in frames {
            let frame = match frame {
                // Placeholder stream ids are filled in with the real one.
                TunnelFrame::ClientEnd(signed) if signed.signer() == &seeded_key(99).hotkey() => {
                    TunnelFrame::ClientEnd(Signed::sign(
                        &client_key(),
                        &ClientStreamSignature {
                            job_id: JOB_ID,
                            stream,
                            digest_in: signed.verify().unwrap().digest_in,
                        },
                    ))
                }
                other => other,
            };
            let _ = send.send(&frame).await;
        }
        let _ = send.finish();
    })
    .await
}

fn client_end(key: &SecretKey, job_id: JobId, stream: u64, sent: &[u8]) -> TunnelFrame {
    TunnelFrame::ClientEnd(Signed::sign(
        key,
        &ClientStreamSignature {
            job_id,
            stream,
            digest_in: digest(sent),
        },
    ))
}

/// A `ClientEnd` signed by the right client key for the real stream (see [`raw_exchange`]).
fn good_client_end(sent: &[u8]) -> TunnelFrame {
    client_end(&seeded_key(99), JOB_ID, 0, sent)
}

#[tokio::test]
async fn a_bad_client_signature_resets_the_stream_with_a_typed_error() {
    let cases: Vec<(&str, Vec<TunnelFrame>)> = vec![
        (
            "another key",
            vec![
                TunnelFrame::Data(b"hi".to_vec()),
                client_end(&seeded_key(15), JOB_ID, 0, b"hi"),
            ],
        ),
        (
            "wrong digest",
            vec![TunnelFrame::Data(b"hi".to_vec()), good_client_end(b"ho")],
        ),
        (
            "wrong job",
            vec![
                TunnelFrame::Data(b"hi".to_vec()),
                client_end(&client_key(), JobId([1; 16]), 0, b"hi"),
            ],
        ),
        (
            "wrong stream",
            vec![
                TunnelFrame::Data(b"hi".to_vec()),
                client_end(&client_key(), JOB_ID, 8, b"hi"),
            ],
        ),
    ];
    for (name, frames) in cases {
        let (result, read_error) = raw_exchange(frames).await;
        let error = result.unwrap_err();
        assert!(
            matches!(error, TunnelError::BadClientSignature(_)),
            "{name}: {error:?}"
        );
        assert_eq!(
            read_error,
            quinn::ReadError::Reset(codes::PROTOCOL_VIOLATION),
            "{name}"
        );
    }
}

#[tokio::test]
async fn protocol_violations_are_typed() {
    let (result, read_error) = raw_exchange(vec![TunnelFrame::Data(b"no end".to_vec())]).await;
    assert!(
        matches!(result, Err(TunnelError::MissingClientEnd)),
        "{result:?}"
    );
    assert_eq!(
        read_error,
        quinn::ReadError::Reset(codes::PROTOCOL_VIOLATION)
    );

    let receipt = Signed::sign(
        &client_key(),
        &JobReceipt {
            job_id: JOB_ID,
            stream: 0,
            digest_in: [0; 32],
            digest_out: [0; 32],
            bytes_in: 0,
            bytes_out: 0,
        },
    );
    let (result, _) = raw_exchange(vec![TunnelFrame::JobEnd(receipt)]).await;
    assert!(
        matches!(result, Err(TunnelError::UnexpectedFrame(_))),
        "{result:?}"
    );
}

/// Every malformed frame the executor can be sent is a typed frame error that resets the
/// stream, with `FRAME_TOO_LARGE` for a length over a cap and `PROTOCOL_VIOLATION` otherwise.
#[tokio::test]
async fn malformed_tunnel_frames_are_typed_errors_that_reset_the_stream() {
    let frame = |len: u32, body: &[u8]| {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    };
    fn too_large(error: &TunnelError) -> bool {
        matches!(
            error,
            TunnelError::Frame(horde_protocol::FrameError::TooLarge { .. })
        )
    }
    fn other_frame_error(error: &TunnelError) -> bool {
        matches!(error, TunnelError::Frame(_)) && !too_large(error)
    }
    type Check = fn(&TunnelError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Check, VarInt)> = vec![
        (
            "length 0",
            frame(0, b""),
            |e| matches!(e, TunnelError::Frame(horde_protocol::FrameError::Empty)),
            codes::PROTOCOL_VIOLATION,
        ),
        (
            "length cap + 1",
            frame(horde_transport::tunnel::MAX_TUNNEL_FRAME_LEN + 1, b"\0"),
            too_large,
            codes::FRAME_TOO_LARGE,
        ),
        (
            "length 2^32 - 1",
            frame(u32::MAX, b"\0"),
            too_large,
            codes::FRAME_TOO_LARGE,
        ),
        (
            "Data length prefix never ends",
            frame(7, &[0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80]),
            other_frame_error,
            codes::PROTOCOL_VIOLATION,
        ),
        (
            "Data longer than its frame",
            frame(3, &[0, 100, b'x']),
            other_frame_error,
            codes::PROTOCOL_VIOLATION,
        ),
        (
            "bytes after the Data",
            frame(5, &[0, 1, b'x', b'y', b'z']),
            other_frame_error,
            codes::PROTOCOL_VIOLATION,
        ),
        (
            "end frame over its cap",
            frame(5000, &[1; 5000]),
            too_large,
            codes::FRAME_TOO_LARGE,
        ),
        (
            "unknown frame tag",
            frame(3, &[9, 1, 2]),
            other_frame_error,
            codes::PROTOCOL_VIOLATION,
        ),
        (
            "undecodable ClientEnd",
            frame(3, &[1, 0xff, 0xff]),
            other_frame_error,
            codes::PROTOCOL_VIOLATION,
        ),
        (
            "header cut short",
            vec![0, 0],
            |e| {
                matches!(
                    e,
                    TunnelError::Frame(horde_protocol::FrameError::Truncated { .. })
                )
            },
            codes::PROTOCOL_VIOLATION,
        ),
        (
            "Data cut short",
            frame(100, &[0, 98, b'x']),
            |e| {
                matches!(
                    e,
                    TunnelError::Frame(horde_protocol::FrameError::Truncated { .. })
                )
            },
            codes::PROTOCOL_VIOLATION,
        ),
    ];
    for (name, bytes, check, code) in cases {
        let (result, read_error) = raw_stream_exchange(|mut send, _| async move {
            let _ = send.write_all(&bytes).await;
            let _ = send.finish();
        })
        .await;
        let error = result.unwrap_err();
        assert!(check(&error), "{name}: {error:?}");
        assert_eq!(error.error_code(), code, "{name}");
        assert_eq!(read_error, quinn::ReadError::Reset(code), "{name}");
    }
}

/// A raw client that sends `hi` and a `ClientEnd` by the right key for the real stream, its
/// signature flipped by one bit when `forge`; returns the frames it got and the server's result.
async fn raw_client_end(
    forge: bool,
) -> (
    Vec<TunnelFrame>,
    Result<horde_transport::tunnel::TunnelStats, TunnelError>,
) {
    let server = job_endpoint();
    let addr = server.local_addr().unwrap();
    let target = echo_job().await;
    let serve = tokio::spawn(async move {
        let connection = server.accept().await.unwrap().unwrap().connection;
        let (send, recv) = connection.accept_bi().await.unwrap();
        let result = serve_tunnel_stream(send, recv, &context(target)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
        result
    });
    let client_endpoint = localhost_endpoint(&client_key());
    let connection = client_endpoint
        .connect(addr, &job_key().hotkey(), ALPN_JOB)
        .await
        .unwrap();
    let (send, recv) = connection.open_bi().await.unwrap();
    let stream = u64::from(send.id());
    let (mut send, mut recv) = split(send, recv);
    send.send(&TunnelFrame::Data(b"hi".to_vec())).await.unwrap();
    let mut end = client_end(&client_key(), JOB_ID, stream, b"hi");
    if forge && let TunnelFrame::ClientEnd(signed) = &end {
        let mut signature = *signed.signature().as_bytes();
        signature[10] ^= 1;
        end = TunnelFrame::ClientEnd(Signed::from_parts(
            signed.bytes().to_vec(),
            *signed.signer(),
            Signature::from_bytes(signature),
        ));
    }
    send.send(&end).await.unwrap();
    send.finish().unwrap();
    let mut frames = Vec::new();
    while let Some(frame) = recv.recv::<TunnelFrame>().await.unwrap() {
        frames.push(frame);
    }
    connection.close(codes::SHUTDOWN, b"");
    (frames, serve.await.unwrap())
}

#[tokio::test]
async fn a_good_raw_client_end_is_accepted() {
    // The placeholder mechanism of raw_exchange itself, on the happy path: the server answers
    // with a receipt and finishes, so the raw reader sees the end instead of a reset.
    let (frames, result) = raw_client_end(false).await;
    assert_eq!(frames[0], TunnelFrame::Data(b"hi".to_vec()));
    assert_eq!(
        frames[1],
        TunnelFrame::Data(Vec::new()),
        "output-ended marker"
    );
    assert!(matches!(frames[2], TunnelFrame::JobEnd(_)));
    let stats = result.unwrap();
    assert!(stats.client_end.is_some());
    assert_eq!((stats.bytes_in, stats.bytes_out), (2, 2));
}

#[tokio::test]
async fn a_forged_client_signature_is_caught_after_the_receipt() {
    // Job, stream, signer and digest match, so the reply and the receipt go out (they do not
    // depend on the client's signature); the signature check that follows fails the stream in
    // the executor's records.
    let (frames, result) = raw_client_end(true).await;
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert!(matches!(frames[2], TunnelFrame::JobEnd(_)));
    assert!(
        matches!(result, Err(TunnelError::BadClientSignature(_))),
        "{result:?}"
    );
}

/// A TCP job that discards everything it reads, closing at the client's EOF.
async fn sink_job() -> SocketAddr {
    let listener = TcpListener::bind(localhost()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 256 * 1024];
                while tcp.read(&mut buffer).await.is_ok_and(|read| read > 0) {}
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a throughput measurement: cargo test --release -p horde-transport --test tunnel -- --ignored"]
async fn throughput_of_the_tunnel_against_raw_quinn() {
    const LEN: usize = 512 * 1024 * 1024;
    let block = bytes::Bytes::from(noise(1024 * 1024, 3));

    // Raw quinn: one stream, the server reads and discards.
    let server = job_endpoint();
    let addr = server.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let connection = server.accept().await.unwrap().unwrap().connection;
        let (_send, mut recv) = connection.accept_bi().await.unwrap();
        let mut total = 0;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.unwrap() {
            total += chunk.bytes.len();
        }
        total
    });
    let client_endpoint = localhost_endpoint(&client_key());
    let connection = client_endpoint
        .connect(addr, &job_key().hotkey(), ALPN_JOB)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    for _ in 0..LEN / block.len() {
        send.write_chunk(block.clone()).await.unwrap();
    }
    send.finish().unwrap();
    assert_eq!(reader.await.unwrap(), LEN);
    let raw = started.elapsed();

    // The tunnel: client → job endpoint → TCP → a job that discards, with digests both ends.
    let setup = setup(sink_job().await).await;
    let started = std::time::Instant::now();
    let mut tunnel = open(&setup.connection).await;
    for _ in 0..LEN / block.len() {
        tunnel.write_bytes(block.clone()).await.unwrap();
    }
    tunnel.finish_sending().await.unwrap();
    assert!(read_to_end(&mut tunnel).await.unwrap().is_empty());
    let tunneled = started.elapsed();
    let mib = (LEN / (1024 * 1024)) as f64;
    println!(
        "raw quinn {:.0} MiB/s, tunnel {:.0} MiB/s, ratio {:.2}",
        mib / raw.as_secs_f64(),
        mib / tunneled.as_secs_f64(),
        raw.as_secs_f64() / tunneled.as_secs_f64()
    );
}

/// The job ends while a stream is in flight: draining lets that stream finish with its whole
/// reply and receipt, accepts no new stream, then closes the connection with `SHUTDOWN`.
#[tokio::test]
async fn drain_lets_the_streams_in_flight_end_with_their_receipts() {
    let setup = setup(echo_job().await).await;
    let mut in_flight = open(&setup.connection).await;
    in_flight.write(b"last words").await.unwrap();
    // The executor has the stream: its echo is back.
    assert_eq!(&in_flight.read().await.unwrap().unwrap()[..], b"last words");
    let draining = tokio::spawn(setup.handle.drain(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A stream opened while draining is never served.
    let mut late = open(&setup.connection).await;
    late.write(b"too late").await.unwrap();
    late.finish_sending().await.unwrap();
    // The one in flight ends normally.
    in_flight.write(b"!").await.unwrap();
    in_flight.finish_sending().await.unwrap();
    assert_eq!(read_to_end(&mut in_flight).await.unwrap(), b"!");
    let receipt = in_flight.receipt().unwrap().verify().unwrap();
    assert_eq!((receipt.bytes_in, receipt.bytes_out), (11, 11));
    assert_eq!(draining.await.unwrap(), (1, 0));
    assert!(read_to_end(&mut late).await.is_err());
    match setup.connection.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, codes::SHUTDOWN);
        }
        other => panic!("{other:?}"),
    }
}

/// Draining is bounded: a stream that never ends is cut at the grace period.
#[tokio::test]
async fn drain_cuts_a_stream_that_never_ends_at_the_grace() {
    let setup = setup(echo_job().await).await;
    let mut endless = open(&setup.connection).await;
    endless.write(b"ping").await.unwrap();
    assert_eq!(&endless.read().await.unwrap().unwrap()[..], b"ping");
    let started = std::time::Instant::now();
    setup.handle.drain(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(read_to_end(&mut endless).await.is_err());
}
