//! What quinn itself allows for a round trip on an open connection: a bare quinn echo (horde's
//! TLS and transport configuration, one bidirectional stream, a 32 B message sent and read back,
//! no framing, digests or signatures), both ends in this process. Measured three ways, the
//! reference rows' floor:
//!
//! - on the benchmark's multi-thread runtime (2 workers, tokio's default on this machine), as
//!   quinn runs in a `horde` process by default;
//! - both ends on one current-thread runtime: quinn's own CPU cost, no wake-up crosses a thread;
//! - each end on its own current-thread runtime thread: one wake-up across threads per leg, as
//!   between two single-threaded processes.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context as _;
use horde_protocol::{Hotkey, SecretKey};
use horde_transport::{ALPN_JOB, HordeEndpoint};

use super::ms;

/// The echoed message's size.
const MESSAGE: usize = 32;

/// The ways the echo runs, in the order reported.
pub(crate) const ROWS: [&str; 3] = ["quinn, 2 workers", "quinn, 1 thread", "quinn, 2 threads"];

/// Echoes every message on the first bidirectional stream of the first connection, until the
/// stream ends.
async fn serve(endpoint: HordeEndpoint) -> anyhow::Result<()> {
    let connection = endpoint.accept().await.context("accept")??.connection;
    let (mut send, mut recv) = connection.accept_bi().await?;
    let mut message = [0u8; MESSAGE];
    loop {
        match recv.read_exact(&mut message).await {
            Ok(()) => send.write_all(&message).await?,
            Err(quinn::ReadExactError::FinishedEarly(0)) => break,
            Err(error) => return Err(error.into()),
        }
    }
    send.finish()?;
    connection.closed().await;
    Ok(())
}

/// Connects to the echo at `addr`, warms the stream with one echo, then times `messages`
/// echoes; milliseconds each.
async fn trips(addr: SocketAddr, server: Hotkey, messages: usize) -> anyhow::Result<Vec<f64>> {
    let client = super::loopback_endpoint(&SecretKey::generate())?;
    let connection = client.connect(addr, &server, ALPN_JOB).await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let payload = [0x61u8; MESSAGE];
    let mut echo = [0u8; MESSAGE];
    let mut samples = Vec::with_capacity(messages);
    for index in 0..=messages {
        let started = Instant::now();
        send.write_all(&payload).await?;
        recv.read_exact(&mut echo).await?;
        let elapsed = ms(started.elapsed());
        anyhow::ensure!(echo == payload, "quinn echo differs");
        if index > 0 {
            samples.push(elapsed);
        }
    }
    send.finish()?;
    anyhow::ensure!(
        recv.read_to_end(MESSAGE).await?.is_empty(),
        "echo after the end"
    );
    connection.close(0u32.into(), b"done");
    client.wait_idle().await;
    Ok(samples)
}

/// A server endpoint on the current runtime: its address and key.
fn bind_server() -> anyhow::Result<(HordeEndpoint, SocketAddr, Hotkey)> {
    let key = SecretKey::generate();
    let endpoint = super::loopback_endpoint(&key)?;
    let addr = endpoint.local_addr()?;
    Ok((endpoint, addr, key.hotkey()))
}

/// Both ends on the current runtime.
async fn same_runtime(messages: usize) -> anyhow::Result<Vec<f64>> {
    let (endpoint, addr, key) = bind_server()?;
    let server = tokio::spawn(serve(endpoint));
    let samples = trips(addr, key, messages).await?;
    server.await??;
    Ok(samples)
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Both ends on one current-thread runtime, on a thread of its own.
fn one_thread(messages: usize) -> anyhow::Result<Vec<f64>> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| current_thread()?.block_on(same_runtime(messages)))
            .join()
            .map_err(|_| anyhow::anyhow!("echo thread panicked"))?
    })
}

/// The server on one current-thread runtime thread, the client on another.
fn two_threads(messages: usize) -> anyhow::Result<Vec<f64>> {
    let (bound_tx, bound_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::scope(|scope| {
        let server = scope.spawn(move || {
            let runtime = current_thread()?;
            runtime.block_on(async {
                let (endpoint, addr, key) = bind_server()?;
                bound_tx.send((addr, key))?;
                serve(endpoint).await
            })
        });
        let client = scope.spawn(move || {
            let (addr, key) = bound_rx.recv().context("echo server did not start")?;
            current_thread()?.block_on(trips(addr, key, messages))
        });
        let samples = client
            .join()
            .map_err(|_| anyhow::anyhow!("echo client panicked"))?;
        server
            .join()
            .map_err(|_| anyhow::anyhow!("echo server panicked"))??;
        samples
    })
}

/// One round of every row, `messages` echoes each; in [`ROWS`]' order.
pub(crate) async fn round(messages: usize) -> anyhow::Result<[Vec<f64>; 3]> {
    let default = same_runtime(messages).await?;
    let (one, two) = tokio::task::spawn_blocking(move || {
        anyhow::Ok((one_thread(messages)?, two_threads(messages)?))
    })
    .await??;
    Ok([default, one, two])
}
