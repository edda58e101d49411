//! Test helpers (feature `test-utils`): seeded keys and endpoints on `127.0.0.1:0`, and an
//! impaired UDP path between two endpoints (`impaired_path.rs`), and a small tmpfs for tests of
//! full disks (`small_disk.rs`).

mod impaired_path;
mod small_disk;

pub use impaired_path::{ImpairedPath, Impairment, PathCounts};
pub use small_disk::SmallDisk;

use std::net::{Ipv4Addr, SocketAddr};

use horde_protocol::SecretKey;

use crate::endpoint::{EndpointConfig, HordeEndpoint};
use crate::tls::{ALPN_BLOB, ALPN_CONTROL, ALPN_JOB};

/// The key with seed `[n; 32]`: the same key in every run.
pub fn seeded_key(n: u8) -> SecretKey {
    SecretKey::from_seed(&[n; 32])
}

/// An endpoint configuration on `127.0.0.1:0` accepting all three horde ALPNs.
pub fn localhost_config() -> EndpointConfig {
    EndpointConfig::new(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        &[ALPN_CONTROL, ALPN_BLOB, ALPN_JOB],
    )
}

/// An endpoint with `key` and [`localhost_config`].
pub fn localhost_endpoint(key: &SecretKey) -> HordeEndpoint {
    HordeEndpoint::bind(key, localhost_config()).expect("binding 127.0.0.1:0")
}

/// Two endpoints on `127.0.0.1:0` with keys [`seeded_key`]`(1)` and `(2)`, all ALPNs.
pub async fn endpoint_pair() -> (HordeEndpoint, HordeEndpoint) {
    (
        localhost_endpoint(&seeded_key(1)),
        localhost_endpoint(&seeded_key(2)),
    )
}

/// Two endpoints from [`endpoint_pair`] and one `horde/control/1` connection between them.
#[derive(Debug)]
pub struct ConnectedPair {
    /// The dialing endpoint (key 1).
    pub client_endpoint: HordeEndpoint,
    /// The listening endpoint (key 2).
    pub server_endpoint: HordeEndpoint,
    /// The client's side of the connection.
    pub client: quinn::Connection,
    /// The server's side of the connection.
    pub server: quinn::Connection,
}

/// [`endpoint_pair`], connected: the client (key 1) dials the server (key 2) on `horde/control/1`.
pub async fn connected_pair() -> ConnectedPair {
    let (client_endpoint, server_endpoint) = endpoint_pair().await;
    let addr = server_endpoint.local_addr().expect("bound address");
    let server_key = server_endpoint.hotkey();
    let (client, accepted) = tokio::join!(
        client_endpoint.connect(addr, &server_key, ALPN_CONTROL),
        server_endpoint.accept()
    );
    let client = client.expect("connecting to the test server");
    let server = accepted
        .expect("server endpoint open")
        .expect("accepting the test client")
        .connection;
    ConnectedPair {
        client_endpoint,
        server_endpoint,
        client,
        server,
    }
}

/// A TCP echo job on `127.0.0.1:0`: echoes everything on each connection until the peer's EOF,
/// then closes its side. Runs until the runtime ends.
pub async fn echo_job() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("binding 127.0.0.1:0");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
            });
        }
    });
    addr
}

/// A job endpoint for job `[job; 16]` whose job's TCP port is `target` (job key
/// [`seeded_key`]`(key_seed + 1)`, client key `seeded_key(key_seed)`), served by
/// [`serve_job_endpoint`](crate::tunnel::serve_job_endpoint), and a client [`JobTunnel`] to it.
///
/// [`JobTunnel`]: crate::tunnel::JobTunnel
pub async fn job_tunnel(
    target: SocketAddr,
    job: u8,
    key_seed: u8,
) -> (crate::tunnel::JobTunnel, crate::tunnel::JobEndpointHandle) {
    use std::sync::Arc;

    use horde_protocol::JobId;

    use crate::tunnel::{JobTunnel, TunnelContext, serve_job_endpoint};

    let (client_key, job_key) = (seeded_key(key_seed), seeded_key(key_seed.wrapping_add(1)));
    let config = EndpointConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), &[ALPN_JOB])
        .with_client_policy(crate::ClientPolicy::Only(client_key.hotkey()));
    let server = HordeEndpoint::bind(&job_key, config).expect("binding 127.0.0.1:0");
    let addr = server.local_addr().expect("bound address");
    let ctx = Arc::new(TunnelContext {
        job_id: JobId([job; 16]),
        job_key: job_key.clone(),
        client_key: client_key.hotkey(),
        target: Arc::new(target),
    });
    let handle = serve_job_endpoint(server, ctx, tokio_util::sync::CancellationToken::new());
    let connection = localhost_endpoint(&client_key)
        .connect(addr, &job_key.hotkey(), ALPN_JOB)
        .await
        .expect("connecting to the job endpoint");
    let tunnel = JobTunnel::new(connection, JobId([job; 16]), client_key, job_key.hotkey())
        .expect("the job endpoint presents the job key");
    (tunnel, handle)
}
