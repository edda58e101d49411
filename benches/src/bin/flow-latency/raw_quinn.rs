//! Raw quinn with horde's transport settings, no horde protocol on top: the bulk rate and the
//! round trip of one stream per request, the floor the tunnel rows are compared with.

use super::*;

/// Where the sending end of [`raw_quinn_throughput`] lives across a veth pair: its socket is made
/// on a thread in the server's namespace, bound to the server's address, and it runs on the
/// server namespace's runtime (threads of their own, as the executor is a process of its own).
pub(crate) struct FarSide<'a> {
    pub(crate) namespace: &'a str,
    pub(crate) runtime: &'a tokio::runtime::Handle,
    pub(crate) ip: std::net::IpAddr,
}

/// One stream of `size` bytes from a bare quinn endpoint to this runtime's; Gbit/s. `far`: the
/// sender across a veth pair (packets of at most 1,452 bytes there), else on this runtime over
/// loopback.
pub(crate) async fn raw_quinn_throughput(
    size: u64,
    far: Option<FarSide<'_>>,
) -> anyhow::Result<f64> {
    let server_key = SecretKey::generate();
    let client_key = SecretKey::generate();
    // Loopback cannot reach the pair's far end: there the client binds to any address.
    let client_ip = match far {
        Some(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        None => LOOPBACK,
    };
    let client = endpoint(&client_key, client_ip, ALPN_JOB, ClientPolicy::Any)?;
    let (server, runtime) = match far {
        None => (
            loopback_endpoint(&server_key)?,
            tokio::runtime::Handle::current(),
        ),
        Some(far) => {
            let server = horde_benches::netns::run_in(far.namespace, || {
                let _entered = far.runtime.enter();
                endpoint(&server_key, far.ip, ALPN_JOB, ClientPolicy::Any)
            })?;
            (server, far.runtime.clone())
        }
    };
    let addr = server.local_addr()?;
    let sender = runtime.spawn(async move {
        let connection = server.accept().await.context("accept")??.connection;
        let (mut send, _recv) = connection.open_bi().await?;
        let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            send.write_chunk(chunk.slice(..n)).await?;
            left -= n as u64;
        }
        send.finish()?;
        connection.closed().await;
        anyhow::Ok(())
    });
    let connection = client.connect(addr, &server_key.hotkey(), ALPN_JOB).await?;
    let started = Instant::now();
    let (_send, mut recv) = connection.accept_bi().await?;
    let mut total = 0u64;
    while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
        total += chunk.bytes.len() as u64;
    }
    let elapsed = started.elapsed();
    connection.close(0u32.into(), b"done");
    let _ = sender.await;
    anyhow::ensure!(total == size, "raw quinn short read {total}");
    Ok(gbit(size, elapsed))
}

/// Request/response round trips over raw quinn (new stream per request, both ends here): the
/// floor any QUIC tunnel stream pays, to read the tunnel's ratio against.
pub(crate) async fn raw_quinn_round_trips(requests: usize) -> anyhow::Result<Vec<f64>> {
    let server_key = SecretKey::generate();
    let server = loopback_endpoint(&server_key)?;
    let client = endpoint(
        &SecretKey::generate(),
        LOOPBACK,
        ALPN_JOB,
        ClientPolicy::Any,
    )?;
    let addr = server.local_addr()?;
    tokio::spawn(async move {
        let Some(Ok(horde_transport::IncomingConnection { connection, .. })) =
            server.accept().await
        else {
            return;
        };
        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
            tokio::spawn(async move {
                if recv.read_to_end(64 * 1024).await.is_ok() {
                    let _ = send
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    let _ = send.finish();
                }
            });
        }
    });
    let connection = client.connect(addr, &server_key.hotkey(), ALPN_JOB).await?;
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(b"GET /health HTTP/1.1\r\nHost: job\r\nConnection: close\r\n\r\n")
            .await?;
        send.finish()?;
        let response = recv.read_to_end(64 * 1024).await?;
        anyhow::ensure!(response.ends_with(b"ok"), "raw quinn response");
        samples.push(ms(started.elapsed()));
    }
    connection.close(0u32.into(), b"done");
    Ok(samples)
}
