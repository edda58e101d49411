//! The design's floor: the least work any implementation of the tunnel must do, to read the
//! tunnel's figures against.
//!
//! A relay stream here is a plain quinn bidirectional stream that the relay connects to the
//! job's TCP port, copying both ways and hashing both directions with BLAKE3 (the digests a
//! receipt signs); the client hashes what it receives. There is no framing, no `End` frame, no
//! signature and no check of one. So the tunnel's cost above this floor is our implementation's,
//! and the floor's cost above direct TCP (or raw quinn) is the design's: a QUIC hop, a TCP hop
//! to the job and the digests.
//!
//! For the round trip the relay runs in its own process (this binary, `--floor-relay`), as the
//! executor does; for bulk it also runs in this process, beside the in-process tunnel row.

use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::BytesMut;
use horde_protocol::{NodeAddr, SecretKey};
use horde_transport::{ALPN_JOB, HordeEndpoint};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Read size on both hops: the tunnel's.
const CHUNK: usize = horde_transport::tunnel::DATA_CHUNK;

/// Serves relay streams to `target` on `endpoint` until the endpoint closes.
pub(crate) async fn serve(endpoint: HordeEndpoint, target: SocketAddr) {
    while let Some(accepted) = endpoint.accept().await {
        let Ok(horde_transport::IncomingConnection { connection, .. }) = accepted else {
            continue;
        };
        tokio::spawn(async move {
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(async move {
                    if let Err(error) = relay_stream(send, recv, target).await {
                        eprintln!("floor relay stream: {error:#}");
                    }
                });
            }
        });
    }
}

/// Starts a relay to `target` in this process; returns its address.
pub(crate) fn start_in_process(target: SocketAddr) -> anyhow::Result<NodeAddr> {
    let key = SecretKey::generate();
    let endpoint = super::loopback_endpoint(&key)?;
    let addr = NodeAddr::new(key.hotkey(), endpoint.local_addr()?);
    tokio::spawn(serve(endpoint, target));
    Ok(addr)
}

/// The `--floor-relay TARGET` mode: serves relay streams to `TARGET` and prints its address
/// (`HOTKEY@IP:PORT`) as the first line on stdout.
pub(crate) async fn run_process(target: SocketAddr) -> anyhow::Result<()> {
    let key = SecretKey::generate();
    let endpoint = super::loopback_endpoint(&key)?;
    println!("{}", NodeAddr::new(key.hotkey(), endpoint.local_addr()?));
    serve(endpoint, target).await;
    Ok(())
}

/// A relay in a child process (this binary with `--floor-relay`), killed on drop.
pub(crate) struct RelayProcess {
    pub(crate) addr: NodeAddr,
    _child: tokio::process::Child,
}

impl RelayProcess {
    pub(crate) async fn spawn(target: SocketAddr) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["--floor-relay", &target.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await?;
        let addr = line.trim().parse().context("relay address line")?;
        Ok(Self {
            addr,
            _child: child,
        })
    }
}

async fn relay_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    target: SocketAddr,
) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let inbound = async {
        let mut digest = blake3::Hasher::new();
        let mut buffer = BytesMut::with_capacity(CHUNK);
        loop {
            buffer.reserve(CHUNK);
            if recv.read_buf(&mut buffer).await? == 0 {
                break;
            }
            digest.update(&buffer);
            tcp_write.write_all(&buffer).await?;
            buffer.clear();
        }
        tcp_write.shutdown().await?;
        anyhow::Ok(digest.finalize())
    };
    let outbound = async {
        let mut digest = blake3::Hasher::new();
        let mut buffer = BytesMut::with_capacity(CHUNK);
        loop {
            buffer.reserve(CHUNK);
            if tcp_read.read_buf(&mut buffer).await? == 0 {
                break;
            }
            let chunk = buffer.split().freeze();
            digest.update(&chunk);
            send.write_chunk(chunk).await?;
        }
        send.finish()?;
        anyhow::Ok(digest.finalize())
    };
    tokio::try_join!(inbound, outbound)?;
    Ok(())
}

/// Sends `request` on a new relay stream and reads the reply to its end, hashing it as a tunnel
/// client does; `received` sees each piece. Returns the bytes received.
pub(crate) async fn exchange(
    connection: &quinn::Connection,
    request: &[u8],
    mut received: impl FnMut(&[u8]),
) -> anyhow::Result<u64> {
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(request).await?;
    send.finish()?;
    let mut digest = blake3::Hasher::new();
    let mut buffer = BytesMut::with_capacity(CHUNK);
    let mut total = 0u64;
    loop {
        buffer.reserve(CHUNK);
        if recv.read_buf(&mut buffer).await? == 0 {
            break;
        }
        digest.update(&buffer);
        received(&buffer);
        total += buffer.len() as u64;
        buffer.clear();
    }
    std::hint::black_box(digest.finalize());
    Ok(total)
}

/// A client connection to a relay, with the endpoint it lives on.
pub(crate) struct RelayClient {
    pub(crate) connection: quinn::Connection,
    _endpoint: HordeEndpoint,
}

impl RelayClient {
    /// Connects a new client endpoint to the relay at `addr`.
    pub(crate) async fn connect(addr: &NodeAddr) -> anyhow::Result<Self> {
        let endpoint = super::loopback_endpoint(&SecretKey::generate())?;
        let target = *addr.addrs.first().context("relay without an address")?;
        let connection = endpoint.connect(target, &addr.hotkey, ALPN_JOB).await?;
        Ok(Self {
            connection,
            _endpoint: endpoint,
        })
    }
}
