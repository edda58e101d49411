//! Admission that favours known peers (issue 16, item 10): a flood of fresh keys from one
//! address does not lock a new client out of the facilitator, and does not grow its memory
//! beyond the bound the README states; nor does a flood from several addresses that holds the
//! unknown keys' whole share with streams open; junk datagrams at every port leave the network
//! working.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use horde_node::client::{Client, JobRequest};
use horde_protocol::{NodeAddr, SecretKey};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};
use horde_transport::{ALPN_CONTROL, EndpointConfig, HordeEndpoint, codes};
use tokio::task::JoinSet;

/// Fresh keys in the flood.
const FLOOD_KEYS: usize = 2_000;

/// The flood tests one at a time: each compares a client's time during its flood with the usual
/// time, which another test's flood on the same two cores would skew (seen in CI 2026-12-08).
static ONE_FLOOD_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Flood connections handshaking at once.
const FLOOD_IN_FLIGHT: usize = 64;

/// The facilitator's resident memory during the flood stays under this (README, "Fault
/// matrix"): the flood holds at most one address's share of the unknown keys' slots (8).
const FACILITATOR_RSS_BOUND_KIB: u64 = 64 * 1024;

fn demo_request() -> JobRequest {
    let program = demo_job_binary().expect("demo job binary");
    JobRequest::command("cpu", program.to_str().expect("utf-8 path"))
}

/// A new client (a fresh key, from 127.0.0.1) submits a job and waits for its verified
/// endpoint; returns how long that took, then ends the job.
async fn time_to_endpoint(facilitator: &NodeAddr) -> Duration {
    let client = Client::new(SecretKey::generate(), facilitator.clone()).unwrap();
    let started = Instant::now();
    let mut job = client.submit(&demo_request()).await.unwrap();
    job.wait_for_endpoint()
        .await
        .unwrap_or_else(|error| panic!("{error}: {:?}", job.history()));
    let took = started.elapsed();
    job.terminate().await.unwrap();
    job.wait_for_end().await.unwrap();
    client.close().await;
    took
}

/// What became of the flood's connections.
#[derive(Debug, Default)]
struct FloodOutcome {
    handshakes: AtomicUsize,
    refused: AtomicUsize,
    closed_busy: AtomicUsize,
    closed_idle: AtomicUsize,
    /// Closed by the facilitator, its CONNECTION_CLOSE lost under the flood: the client's next
    /// packet was answered with a stateless reset (RFC 9000 §10.3), as it is for any connection
    /// the facilitator no longer holds. Seen once in CI (2026-12-06).
    closed_reset: AtomicUsize,
}

/// Dials `target` from 127.0.0.2 with `keys` fresh keys (each its own endpoint), keeping every
/// connection that gets through open and idle; returns the endpoints and connections held.
async fn flood(
    target: SocketAddr,
    hotkey: horde_protocol::Hotkey,
    keys: usize,
    outcome: Arc<FloodOutcome>,
) -> Vec<(HordeEndpoint, quinn::Connection)> {
    let bind: SocketAddr = ([127, 0, 0, 2], 0).into();
    let mut held = Vec::new();
    let mut dials = JoinSet::new();
    for _ in 0..keys {
        while dials.len() >= FLOOD_IN_FLIGHT {
            if let Some(Ok(Some(pair))) = dials.join_next().await {
                held.push(pair);
            }
        }
        let outcome = Arc::clone(&outcome);
        dials.spawn(async move {
            let config = EndpointConfig::new(bind, &[ALPN_CONTROL]).with_max_connections(1);
            let endpoint = HordeEndpoint::bind(&SecretKey::generate(), config).unwrap();
            match endpoint.connect(target, &hotkey, ALPN_CONTROL).await {
                Ok(connection) => {
                    outcome.handshakes.fetch_add(1, Ordering::Relaxed);
                    Some((endpoint, connection))
                }
                Err(_) => {
                    outcome.refused.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        });
    }
    while let Some(joined) = dials.join_next().await {
        if let Ok(Some(pair)) = joined {
            held.push(pair);
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_fresh_keys_from_one_address_does_not_lock_a_new_client_out() {
    let _alone = ONE_FLOOD_AT_A_TIME.lock().await;
    let testnet = Testnet::start(TestnetConfig::default()).unwrap();
    let facilitator = testnet.facilitator();
    // The first job spawns what later ones reuse; the second is the usual time.
    time_to_endpoint(&facilitator).await;
    let usual = time_to_endpoint(&facilitator).await;
    let rss_before = testnet.rss_kib("facilitator").unwrap();

    let outcome = Arc::new(FloodOutcome::default());
    let flooding = tokio::spawn(flood(
        facilitator.addrs[0],
        facilitator.hotkey,
        FLOOD_KEYS,
        Arc::clone(&outcome),
    ));
    // Let the flood get going: many of its attempts have been answered.
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcome.handshakes.load(Ordering::Relaxed) + outcome.refused.load(Ordering::Relaxed) < 200
    {
        assert!(Instant::now() < deadline, "the flood never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = time_to_endpoint(&facilitator).await;
    let rss_during = testnet.rss_kib("facilitator").unwrap();
    let held = flooding.await.unwrap();
    let rss_after_flood = testnet.rss_kib("facilitator").unwrap();
    // Past the first-stream timeout every flood connection has been closed.
    tokio::time::sleep(horde_transport::FIRST_STREAM_TIMEOUT + Duration::from_secs(2)).await;
    for (_, connection) in &held {
        match connection.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == codes::BUSY =>
            {
                outcome.closed_busy.fetch_add(1, Ordering::Relaxed);
            }
            Some(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == codes::TIMED_OUT =>
            {
                outcome.closed_idle.fetch_add(1, Ordering::Relaxed);
            }
            Some(quinn::ConnectionError::Reset) => {
                outcome.closed_reset.fetch_add(1, Ordering::Relaxed);
            }
            other => panic!("a flood connection is still open or ended otherwise: {other:?}"),
        }
    }
    eprintln!(
        "usual {usual:?}, during the flood {during:?}; flood: {outcome:?}; facilitator RSS \
         {rss_before} KiB before, {rss_during} KiB during, {rss_after_flood} KiB after the flood"
    );
    assert!(
        during <= usual + Duration::from_secs(2),
        "usual {usual:?}, during the flood {during:?}"
    );
    assert!(
        rss_during.max(rss_after_flood) < FACILITATOR_RSS_BOUND_KIB,
        "{rss_during} / {rss_after_flood} KiB"
    );
    assert_eq!(
        outcome.handshakes.load(Ordering::Relaxed) + outcome.refused.load(Ordering::Relaxed),
        FLOOD_KEYS
    );
    // Most of the flood never got a handshake: refused up front for its address.
    assert!(
        outcome.refused.load(Ordering::Relaxed) > FLOOD_KEYS / 2,
        "{outcome:?}"
    );
}

/// Source addresses of the holding flood (127.0.0.2 and on), and the connections each keeps:
/// together the whole of the unknown keys' share (32 of the facilitator's default 128 slots).
const HOLDING_ADDRESSES: u8 = 4;
const HOLDING_PER_ADDRESS: usize = 8;

/// What the holding flood saw.
#[derive(Debug, Default)]
struct HoldingOutcome {
    handshakes: AtomicUsize,
    /// Connections open now.
    held: AtomicUsize,
    /// Closed with `BUSY` to make room for a newer connection.
    evicted: AtomicUsize,
    /// Refused before a handshake, or failed otherwise.
    failed: AtomicUsize,
}

/// A flood that holds its slots: from each of [`HOLDING_ADDRESSES`] addresses,
/// [`HOLDING_PER_ADDRESS`] fresh keys dial `target`, open a stream and send one byte (so none
/// is closed as idle), and hold the connection; a connection closed is dialled again with a
/// fresh key at once, until `stop`.
async fn holding_flood(
    target: SocketAddr,
    hotkey: horde_protocol::Hotkey,
    outcome: Arc<HoldingOutcome>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut holders = JoinSet::new();
    for address in 0..HOLDING_ADDRESSES {
        for _ in 0..HOLDING_PER_ADDRESS {
            let (outcome, mut stop) = (Arc::clone(&outcome), stop.clone());
            holders.spawn(async move {
                let bind: SocketAddr = ([127, 0, 0, 2 + address], 0).into();
                while !*stop.borrow() {
                    let config = EndpointConfig::new(bind, &[ALPN_CONTROL]).with_max_connections(1);
                    let endpoint = HordeEndpoint::bind(&SecretKey::generate(), config).unwrap();
                    let held = async {
                        let connection = endpoint.connect(target, &hotkey, ALPN_CONTROL).await?;
                        outcome.handshakes.fetch_add(1, Ordering::Relaxed);
                        outcome.held.fetch_add(1, Ordering::Relaxed);
                        let open = async {
                            let (mut send, _recv) = connection.open_bi().await?;
                            send.write_all(&[0]).await?;
                            anyhow::Ok(connection.closed().await)
                        };
                        let ended = open.await;
                        outcome.held.fetch_sub(1, Ordering::Relaxed);
                        ended
                    };
                    let ended = tokio::select! {
                        _ = stop.wait_for(|stopped| *stopped) => break,
                        ended = held => ended,
                    };
                    match ended {
                        Ok(quinn::ConnectionError::ApplicationClosed(close))
                            if close.error_code == codes::BUSY =>
                        {
                            outcome.evicted.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            outcome.failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
    }
    while holders.join_next().await.is_some() {}
}

/// Four addresses holding the unknown keys' whole share, each connection with a stream open,
/// and dialling again whenever one is closed, do not lock a new client out: its connection is
/// admitted and one of the flood's makes room (until 2026-12-08 the newcomer was refused `BUSY`
/// for as long as the flood held on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_holding_the_unknown_share_from_several_addresses_does_not_lock_a_new_client_out() {
    let _alone = ONE_FLOOD_AT_A_TIME.lock().await;
    let testnet = Testnet::start(TestnetConfig::default()).unwrap();
    let facilitator = testnet.facilitator();
    time_to_endpoint(&facilitator).await;
    let usual = time_to_endpoint(&facilitator).await;

    let outcome = Arc::new(HoldingOutcome::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let flooding = tokio::spawn(holding_flood(
        facilitator.addrs[0],
        facilitator.hotkey,
        Arc::clone(&outcome),
        stopped,
    ));
    // The flood holds the whole share.
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcome.held.load(Ordering::Relaxed)
        < usize::from(HOLDING_ADDRESSES) * HOLDING_PER_ADDRESS
    {
        assert!(
            Instant::now() < deadline,
            "the flood never held the share: {outcome:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = tokio::time::timeout(Duration::from_secs(30), time_to_endpoint(&facilitator))
        .await
        .unwrap_or_else(|_| panic!("no endpoint within 30 s during the flood: {outcome:?}"));
    let evicted = outcome.evicted.load(Ordering::Relaxed);
    stop.send_replace(true);
    flooding.await.unwrap();
    eprintln!("usual {usual:?}, during the holding flood {during:?}; flood: {outcome:?}");
    assert!(
        during <= usual + Duration::from_secs(2),
        "usual {usual:?}, during the flood {during:?}"
    );
    // The client's connection made room: the flood lost connections to it.
    assert!(evicted >= 1, "{outcome:?}");
}

/// Datagrams of junk: random bytes, QUIC-shaped long headers (an Initial's first byte and
/// version 1, random connection ids and payload; padded to 1,200 bytes as a client's Initial
/// must be) and short headers, from many source ports, aimed at every UDP port the network's
/// nodes listen on (their QUIC and discovery ports).
fn junk_datagrams(count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    (0..count)
        .map(|i| {
            let len = match i % 4 {
                0 => 1 + next() as usize % 64,
                1 | 2 => 1200,
                _ => 1 + next() as usize % 1500,
            };
            let mut datagram: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            match i % 4 {
                // A long-header Initial of QUIC v1 with 8-byte connection ids.
                1 => {
                    datagram[..6].copy_from_slice(&[0xc0, 0, 0, 0, 1, 8]);
                    datagram[14] = 8;
                }
                // A short header (fixed bit set).
                2 => datagram[0] = 0x40 | (datagram[0] & 0x3f),
                _ => {}
            }
            datagram
        })
        .collect()
}

/// Junk on the wire (README, "Fault matrix"): 20,000 datagrams of random and QUIC-shaped bytes
/// at every node's QUIC and discovery ports leave every node running, and a new client's job
/// then runs through the same network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_datagrams_at_every_port_leave_the_network_working() {
    let mut testnet = Testnet::start(TestnetConfig {
        storage: 0,
        ..TestnetConfig::default()
    })
    .unwrap();
    let targets: Vec<SocketAddr> = testnet
        .nodes()
        .iter()
        .flat_map(|node| std::iter::once(node.addr).chain(node.p2p))
        .collect();
    assert!(targets.len() >= 6, "{targets:?}");
    let before = time_to_endpoint(&testnet.facilitator()).await;

    let datagrams = junk_datagrams(20_000, 7);
    let sent = tokio::task::spawn_blocking(move || {
        // 16 source sockets, so the junk comes from many "peers".
        let sockets: Vec<std::net::UdpSocket> = (0..16)
            .map(|_| std::net::UdpSocket::bind("127.0.0.3:0").unwrap())
            .collect();
        let mut sent = 0usize;
        for (i, datagram) in datagrams.iter().enumerate() {
            let target = targets[i % targets.len()];
            if sockets[i % sockets.len()].send_to(datagram, target).is_ok() {
                sent += 1;
            }
        }
        sent
    })
    .await
    .unwrap();
    assert!(sent > 19_000, "only {sent} junk datagrams sent");

    let after = time_to_endpoint(&testnet.facilitator()).await;
    let names: Vec<String> = testnet.nodes().iter().map(|n| n.name.clone()).collect();
    for name in names {
        assert!(
            testnet.is_running(&name).unwrap(),
            "{name} died from junk datagrams:\n{}",
            testnet.log(&name)
        );
    }
    println!("endpoint before the junk {before:?}, after {after:?}");
}
