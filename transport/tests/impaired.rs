//! horde links on an impaired path: a relay on 127.0.0.1 between the two endpoints drops,
//! duplicates, delays and reorders datagrams, cuts the path for a while, or silently drops
//! datagrams over a size (see `test_utils::ImpairedPath`). What must hold, from the reliability
//! test matrix: bytes and receipts exact under loss, reordering and duplication; a short outage
//! ridden out on the same connection; a long one ending both sides with a typed timeout within
//! the idle timeout; an MTU black hole never stalling a transfer for long.

// Helpers outside `#[test]` functions are not covered by clippy's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use horde_protocol::JobId;
use horde_transport::test_utils::{
    ImpairedPath, Impairment, echo_job, localhost_config, localhost_endpoint, seeded_key,
};
use horde_transport::tunnel::{JobTunnel, TunnelContext, serve_job_endpoint};
use horde_transport::{ALPN_CONTROL, ALPN_JOB, HordeEndpoint, TransportTuning};
use tokio_util::sync::CancellationToken;

const JOB_ID: JobId = JobId([0x51; 16]);

/// `len` bytes that differ from position to position, so a reordered or duplicated piece shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Two endpoints (tuned alike) connected on `horde/control/1` through an [`ImpairedPath`].
struct Linked {
    path: ImpairedPath,
    _client_endpoint: HordeEndpoint,
    _server_endpoint: HordeEndpoint,
    client: quinn::Connection,
    server: quinn::Connection,
}

async fn linked(tuning: TransportTuning, seed: u64) -> Linked {
    let server_endpoint = HordeEndpoint::bind(
        &seeded_key(2),
        localhost_config().with_transport(tuning.clone()),
    )
    .unwrap();
    let client_endpoint =
        HordeEndpoint::bind(&seeded_key(1), localhost_config().with_transport(tuning)).unwrap();
    let path = ImpairedPath::start(server_endpoint.local_addr().unwrap(), seed)
        .await
        .unwrap();
    let server_key = seeded_key(2).hotkey();
    let (client, accepted) = tokio::join!(
        client_endpoint.connect(path.addr(), &server_key, ALPN_CONTROL),
        server_endpoint.accept()
    );
    let server = accepted.unwrap().unwrap().connection;
    Linked {
        path,
        _client_endpoint: client_endpoint,
        _server_endpoint: server_endpoint,
        client: client.unwrap(),
        server,
    }
}

/// Sends `data` from `from` on a new stream and reads it on `to`; returns what arrived and the
/// longest time between two pieces (or before the first).
async fn transfer(
    from: &quinn::Connection,
    to: &quinn::Connection,
    data: Vec<u8>,
    during: impl std::future::Future<Output = ()>,
) -> (Vec<u8>, Duration) {
    let (mut send, _) = from.open_bi().await.unwrap();
    let writer = tokio::spawn(async move {
        for piece in data.chunks(64 * 1024) {
            send.write_all(piece).await.unwrap();
        }
        send.finish().unwrap();
        // Until the peer has everything (or the connection is gone).
        let _ = send.stopped().await;
    });
    let (_, mut recv) = to.accept_bi().await.unwrap();
    let reader = async {
        let mut received = Vec::new();
        let mut longest_gap = Duration::ZERO;
        let mut last = Instant::now();
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.unwrap() {
            longest_gap = longest_gap.max(last.elapsed());
            last = Instant::now();
            received.extend_from_slice(&chunk.bytes);
        }
        (received, longest_gap)
    };
    let (result, ()) = tokio::join!(reader, during);
    writer.await.unwrap();
    result
}

/// 4 MiB each way through a job tunnel on a path losing 2% of datagrams, duplicating 2% and
/// reordering them (0–2 ms jitter): every byte arrives in order and the receipt verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_bytes_and_receipt_are_exact_under_loss_reordering_and_duplication() {
    let (client_key, job_key) = (seeded_key(10), seeded_key(11));
    let server = HordeEndpoint::bind(
        &job_key,
        localhost_config()
            .with_client_policy(horde_transport::ClientPolicy::Only(client_key.hotkey())),
    )
    .unwrap();
    let path = ImpairedPath::start(server.local_addr().unwrap(), 7)
        .await
        .unwrap();
    let handle = serve_job_endpoint(
        server,
        Arc::new(TunnelContext {
            job_id: JOB_ID,
            job_key: job_key.clone(),
            client_key: client_key.hotkey(),
            target: Arc::new(echo_job().await),
        }),
        CancellationToken::new(),
    );
    path.set(Impairment {
        loss: 0.02,
        duplicate: 0.02,
        jitter: Duration::from_millis(2),
        ..Impairment::default()
    });
    let client_endpoint = localhost_endpoint(&client_key);
    let connection = client_endpoint
        .connect(path.addr(), &job_key.hotkey(), ALPN_JOB)
        .await
        .unwrap();
    let tunnel = JobTunnel::new(connection.clone(), JOB_ID, client_key, job_key.hotkey()).unwrap();
    let stream = tunnel.open().await.unwrap();
    let (mut writer, mut reader) = stream.into_split();
    let data = pattern(4 << 20);
    let sent = data.clone();
    let writing = tokio::spawn(async move {
        for piece in sent.chunks(256 * 1024) {
            writer.write(piece).await.unwrap();
        }
        writer.finish_sending().await.unwrap();
    });
    let mut echoed = Vec::new();
    while let Some(bytes) = reader.read().await.unwrap() {
        echoed.extend_from_slice(&bytes);
    }
    writing.await.unwrap();
    assert!(echoed == data, "the echo differs from what was sent");
    let receipt = reader.receipt().unwrap().verify().unwrap();
    assert_eq!((receipt.bytes_in, receipt.bytes_out), (4 << 20, 4 << 20));
    assert_eq!(receipt.digest_in, *blake3::hash(&data).as_bytes());
    let dropped = path.counts().dropped.load(Ordering::Relaxed);
    assert!(dropped > 0, "the path dropped nothing");
    assert!(
        connection.close_reason().is_none(),
        "one connection throughout"
    );
    handle.shutdown().await;
}

/// A 2 s outage in the middle of a transfer (well under the 10 s idle timeout): the transfer
/// resumes on the same connection and completes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_outage_is_ridden_out_on_the_same_connection() {
    // Packets of at most 1,452 bytes, so the outage starts about 1 MiB into the 8 MiB (with MTU
    // discovery up to jumbo sizes, 800 datagrams could be most of the transfer, and it could end
    // before the outage).
    let mut tuning = TransportTuning::default();
    tuning.max_udp_payload = 1452;
    let link = linked(tuning, 11).await;
    let data = pattern(8 << 20);
    // About 1 MiB in (the relay switches itself there).
    link.path.set_after(
        800,
        Impairment {
            blackout: true,
            ..Impairment::default()
        },
    );
    let outage = async {
        link.path.switched().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        link.path.set(Impairment::default());
    };
    let (received, longest_gap) = transfer(&link.client, &link.server, data.clone(), outage).await;
    assert!(received == data, "the transfer differs from what was sent");
    assert!(
        longest_gap >= Duration::from_millis(1500),
        "no outage seen: {longest_gap:?}"
    );
    assert!(link.client.close_reason().is_none());
    assert!(link.server.close_reason().is_none());
}

/// An outage longer than the idle timeout (here tuned to 1 s, keep-alives every 250 ms): both
/// ends end the connection with a typed `TimedOut` within about the idle timeout, and a new
/// connection works once the path is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_times_out_both_ends_within_the_idle_timeout() {
    let mut tuning = TransportTuning::default();
    tuning.max_idle_timeout = Duration::from_secs(1);
    tuning.keep_alive_interval = Duration::from_millis(250);
    let link = linked(tuning, 13).await;
    let started = Instant::now();
    link.path.set(Impairment {
        blackout: true,
        ..Impairment::default()
    });
    let (client, server) = tokio::join!(link.client.closed(), link.server.closed());
    let elapsed = started.elapsed();
    assert_eq!(client, quinn::ConnectionError::TimedOut);
    assert_eq!(server, quinn::ConnectionError::TimedOut);
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&elapsed),
        "{elapsed:?}"
    );
}

/// Datagrams over 1280 bytes vanish without a word — from the start, and again from the
/// middle of a transfer after path MTU discovery has raised the packet size: the transfers
/// complete exactly and never stall for 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtu_black_hole_never_stalls_a_transfer() {
    let black_hole = Impairment {
        max_datagram: Some(1280),
        ..Impairment::default()
    };
    // From the start: the handshake's 1200-byte datagrams pass, the MTU probes do not.
    let link = linked(TransportTuning::default(), 17).await;
    link.path.set(black_hole.clone());
    let data = pattern(4 << 20);
    let (received, longest_gap) =
        transfer(&link.client, &link.server, data.clone(), async {}).await;
    assert!(received == data);
    assert!(longest_gap < Duration::from_secs(3), "{longest_gap:?}");

    // From the middle, once larger datagrams have been getting through.
    let link = linked(TransportTuning::default(), 19).await;
    let (warm, _) = transfer(&link.client, &link.server, pattern(1 << 20), async {}).await;
    assert_eq!(warm.len(), 1 << 20);
    let data = pattern(8 << 20);
    // Both directions count: 400 datagrams are well inside the 8 MiB even at jumbo sizes.
    link.path.set_after(400, black_hole.clone());
    let hole = link.path.switched();
    let (received, longest_gap) = transfer(&link.client, &link.server, data.clone(), hole).await;
    assert!(received == data);
    assert!(longest_gap < Duration::from_secs(3), "{longest_gap:?}");
    assert!(link.path.counts().dropped.load(Ordering::Relaxed) > 0);
    assert!(link.client.close_reason().is_none());
}

/// Windows of a few hundred bytes (stream and connection), and both sides sending 2 MiB to
/// each other at once on one stream while reading: flow control stalls and resumes every few
/// packets, and neither direction deadlocks the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_windows_both_ways_do_not_deadlock() {
    let mut tuning = TransportTuning::default();
    tuning.stream_receive_window = 300;
    tuning.receive_window = 600;
    tuning.send_window = 600;
    let link = linked(tuning, 23).await;
    let data = pattern(2 << 20);
    let (client_send, client_recv) = link.client.open_bi().await.unwrap();
    // The server learns of the stream once its first bytes arrive.
    let exchange = |mut send: quinn::SendStream, mut recv: quinn::RecvStream, data: Vec<u8>| async move {
        let writing = async {
            for piece in data.chunks(4096) {
                send.write_all(piece).await.unwrap();
            }
            send.finish().unwrap();
        };
        let reading = async {
            let mut received = Vec::new();
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.unwrap() {
                received.extend_from_slice(&chunk.bytes);
            }
            received
        };
        let ((), received) = tokio::join!(writing, reading);
        received
    };
    let client_side = tokio::spawn(exchange(client_send, client_recv, data.clone()));
    let (server_send, server_recv) = link.server.accept_bi().await.unwrap();
    let server_side = tokio::spawn(exchange(server_send, server_recv, data.clone()));
    let within = Duration::from_secs(60);
    let at_client = tokio::time::timeout(within, client_side)
        .await
        .unwrap()
        .unwrap();
    let at_server = tokio::time::timeout(within, server_side)
        .await
        .unwrap()
        .unwrap();
    assert!(at_client == data && at_server == data);
}

/// A server on a fixed port that crashes (nothing reaches the client: the path is cut while it
/// goes) and comes back with the same key on the same port: the client's next packet draws a
/// stateless reset the client accepts, because the reset key derives from the node's key and
/// port, and its connection ends at once (`Reset`) instead of after the idle timeout. The same
/// when its first run bound port 0 and it comes back on the port it got (as a node keeps its
/// port in `bound.toml`). Back with another key, its reset is not accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resets_its_old_connections_at_once() {
    for (restarted_key, reset_expected, first_on_port_0) in [
        (seeded_key(2), true, false),
        (seeded_key(2), true, true),
        (seeded_key(3), false, false),
    ] {
        let server_endpoint = if first_on_port_0 {
            let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            HordeEndpoint::bind(
                &seeded_key(2),
                horde_transport::EndpointConfig::new(any, &[ALPN_CONTROL]),
            )
            .unwrap()
        } else {
            // A fixed port, as a node's configured `listen` is.
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let fixed = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            HordeEndpoint::bind(
                &seeded_key(2),
                horde_transport::EndpointConfig::new(fixed, &[ALPN_CONTROL]),
            )
            .unwrap()
        };
        let server_addr = server_endpoint.local_addr().unwrap();
        let fixed = || horde_transport::EndpointConfig::new(server_addr, &[ALPN_CONTROL]);
        let path = ImpairedPath::start(server_addr, 29).await.unwrap();
        let client_endpoint = localhost_endpoint(&seeded_key(1));
        let server_key = seeded_key(2).hotkey();
        let (client, accepted) = tokio::join!(
            client_endpoint.connect(path.addr(), &server_key, ALPN_CONTROL),
            server_endpoint.accept()
        );
        let client = client.unwrap();
        let server = accepted.unwrap().unwrap().connection;
        // The cut comes once the client's handshake is confirmed (HANDSHAKE_DONE received). An
        // unconfirmed client keeps sending Handshake (long-header) packets, which a restarted
        // server drops as a "non-initial packet for unknown connection" instead of answering
        // with a stateless reset: cut right after connect, the test failed about 1 time in 8.
        tokio::time::timeout(Duration::from_secs(5), async {
            while client.stats().frame_rx.handshake_done == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the client's handshake is confirmed");
        // The crash: the path is cut, then the server's endpoint and connection are dropped
        // (their close never reaches the client).
        path.set(Impairment {
            blackout: true,
            ..Impairment::default()
        });
        drop(server);
        server_endpoint.close(horde_transport::codes::SHUTDOWN, b"crashed");
        let _ = tokio::time::timeout(Duration::from_secs(2), server_endpoint.wait_idle()).await;
        drop(server_endpoint);
        // Back on the same port once the old socket is released.
        let restarted = loop {
            match HordeEndpoint::bind(&restarted_key, fixed()) {
                Ok(endpoint) => break endpoint,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        path.set(Impairment::default());
        // The client sends: its packet reaches a server that has no such connection. (A probe it
        // sent once the path was back may have drawn the reset already: then the stream is
        // refused, and the connection's end below is the same.)
        if let Ok((mut send, _recv)) = client.open_bi().await {
            let _ = send.write_all(b"anyone there?").await;
        }
        let closed = tokio::time::timeout(Duration::from_secs(2), client.closed()).await;
        if reset_expected {
            assert_eq!(closed.unwrap(), quinn::ConnectionError::Reset);
        } else {
            assert!(
                closed.is_err(),
                "a reset under another key was accepted: {closed:?}"
            );
        }
        drop((restarted, client_endpoint));
    }
}
