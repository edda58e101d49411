//! A local TCP port tunnelled to the job: every accepted connection gets its own tunnel stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use horde_protocol::{JobReceipt, Signed};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{Instrument as _, debug, warn};

use super::client::{JobTunnel, ReaderEvent};
use super::{DATA_CHUNK, MAX_FORWARDED_CONNECTIONS, TunnelError};
use crate::codes;

/// Tunnels every connection accepted on `listener` to the job through its own tunnel stream on
/// `connection`: bytes are pumped both ways, the local client's EOF becomes `finish_sending`,
/// the job's EOF is passed on as a TCP half-close, and each verified receipt is sent on
/// `receipts`. curl, browsers and WebSocket clients work unchanged.
///
/// Runs until the QUIC connection closes (returned as [`TunnelError::Connection`]).
pub async fn forward_tcp(
    listener: TcpListener,
    tunnel: JobTunnel,
    receipts: mpsc::Sender<Signed<JobReceipt>>,
) -> Result<(), TunnelError> {
    let connection = tunnel.connection().clone();
    // New local connections wake this thread too: its spin sees them.
    crate::spin::watch(&listener);
    let slots = Arc::new(Semaphore::new(MAX_FORWARDED_CONNECTIONS));
    let mut tasks = JoinSet::new();
    loop {
        let permit = tokio::select! {
            biased;
            error = connection.closed() => return Err(TunnelError::Connection(error)),
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return Ok(()),
            },
        };
        let (tcp, peer) = tokio::select! {
            biased;
            error = connection.closed() => return Err(TunnelError::Connection(error)),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: transient, keep serving.
                    warn!(%error, "accepting a local connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        crate::spin::watch(&tcp);
        let tunnel = tunnel.clone();
        let receipts = receipts.clone();
        tasks.spawn(
            async move {
                let result = forward_connection(tcp, &tunnel, receipts).await;
                drop(permit);
                match result {
                    Ok(()) => debug!("forwarded connection done"),
                    Err(TunnelError::Local(error)) => {
                        debug!(%error, "the local client went away");
                    }
                    Err(error) => warn!(%error, "forwarded connection failed"),
                }
            }
            .instrument(tracing::debug_span!("forward", %peer)),
        );
    }
}

async fn forward_connection(
    tcp: TcpStream,
    tunnel: &JobTunnel,
    receipts: mpsc::Sender<Signed<JobReceipt>>,
) -> Result<(), TunnelError> {
    let _ = tcp.set_nodelay(true);
    let tunnel = tunnel.open().await?;
    let (mut writer, mut reader) = tunnel.into_split();
    let (mut local_read, mut local_write) = tcp.into_split();

    let up = async {
        let mut buffer = BytesMut::with_capacity(DATA_CHUNK);
        loop {
            buffer.reserve(DATA_CHUNK);
            match local_read.read_buf(&mut buffer).await {
                Ok(0) => break,
                Ok(_) => writer.write_bytes(buffer.split().freeze()).await?,
                Err(error) => {
                    writer.reset(codes::CANCELLED);
                    return Err(TunnelError::Local(error));
                }
            }
        }
        writer.finish_sending().await
    };
    let down = async {
        loop {
            match reader.next_event().await? {
                ReaderEvent::Data(bytes) => {
                    if let Err(error) = local_write.write_all(&bytes).await {
                        // The local client went away while the job still sends: the job is told
                        // to stop (its endpoint closes the job's connection) rather than drained
                        // for a receipt, which a job that never stops sending would never give
                        // (it kept the job, its executor and this process busy after curl quit).
                        reader.stop(codes::CANCELLED);
                        return Err(TunnelError::Local(error));
                    }
                }
                ReaderEvent::OutputEnded => {
                    let _ = local_write.shutdown().await;
                }
                ReaderEvent::Done => {
                    let _ = local_write.shutdown().await;
                    return reader.receipt().cloned().ok_or(TunnelError::MissingReceipt);
                }
            }
        }
    };
    tokio::pin!(up, down);
    let mut up_done = false;
    loop {
        tokio::select! {
            result = &mut down => {
                let receipt = result?;
                // If the owner stopped listening the receipt is dropped; it was verified
                // either way.
                let _ = receipts.send(receipt).await;
                return Ok(());
            }
            result = &mut up, if !up_done => {
                up_done = true;
                match result {
                    Err(error @ TunnelError::Local(_)) => return Err(error),
                    // A tunnel write failure shows up on the reading side as well (a reset,
                    // or the receipt the job sent after its grace period).
                    Err(error) => debug!(%error, "sending to the job ended"),
                    Ok(()) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::job_tunnel;

    /// A forwarder on a fresh loopback port, tunnelling to the job at `target` (`job` and
    /// `key_seed` as for [`job_tunnel`]), passing receipts on through a queue of `queue`.
    struct Forwarder {
        task: tokio::task::JoinHandle<Result<(), TunnelError>>,
        addr: std::net::SocketAddr,
        connection: quinn::Connection,
        receipts: mpsc::Receiver<Signed<JobReceipt>>,
        endpoint: crate::tunnel::JobEndpointHandle,
    }

    impl Forwarder {
        /// Closes the QUIC connection; the forwarder must end with that error. Returns the
        /// endpoint's (served, failed) stream counts.
        async fn close(self) -> (u64, u64) {
            self.connection.close(codes::SHUTDOWN, b"done");
            assert!(matches!(
                self.task.await.unwrap(),
                Err(TunnelError::Connection(_))
            ));
            self.endpoint.shutdown().await
        }
    }

    async fn forwarder(
        target: std::net::SocketAddr,
        job: u8,
        key_seed: u8,
        queue: usize,
    ) -> Forwarder {
        let (tunnel, endpoint) = job_tunnel(target, job, key_seed).await;
        let connection = tunnel.connection().clone();
        let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = local.local_addr().unwrap();
        let (receipts, rx) = mpsc::channel(queue);
        let task = tokio::spawn(forward_tcp(local, tunnel, receipts));
        Forwarder {
            task,
            addr,
            connection,
            receipts: rx,
            endpoint,
        }
    }

    #[tokio::test]
    async fn forwards_a_local_connection_both_ways_with_a_receipt() {
        // A job that upper-cases what it reads until EOF, then closes.
        let job = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = job.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = job.accept().await.unwrap();
            let mut input = Vec::new();
            tcp.read_to_end(&mut input).await.unwrap();
            tcp.write_all(&input.to_ascii_uppercase()).await.unwrap();
        });
        let mut fwd = forwarder(target, 4, 40, 4).await;

        let mut tcp = TcpStream::connect(fwd.addr).await.unwrap();
        tcp.write_all(b"hello job").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut output = Vec::new();
        tcp.read_to_end(&mut output).await.unwrap();
        assert_eq!(output, b"HELLO JOB");
        let receipt = fwd.receipts.recv().await.unwrap().verify().unwrap();
        assert_eq!((receipt.bytes_in, receipt.bytes_out), (9, 9));
        assert_eq!(receipt.digest_out, *blake3::hash(b"HELLO JOB").as_bytes());

        assert_eq!(fwd.close().await, (1, 0));
    }

    /// `horde job forward` runs on a current-thread runtime: many local connections open at
    /// once, each exchanging in turn, are all served by that one thread.
    #[tokio::test(flavor = "current_thread")]
    async fn serves_many_concurrent_connections_on_one_thread() {
        // A job that echoes each line it reads, until EOF.
        let job = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = job.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = job.accept().await {
                tokio::spawn(async move {
                    let (read, mut write) = tcp.into_split();
                    let mut lines = tokio::io::BufReader::new(read);
                    let mut line = String::new();
                    while tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line)
                        .await
                        .is_ok_and(|n| n > 0)
                    {
                        write.write_all(line.as_bytes()).await.unwrap();
                        line.clear();
                    }
                });
            }
        });
        let mut fwd = forwarder(target, 6, 44, 64).await;

        const CONNECTIONS: usize = 40;
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS {
            clients.push(TcpStream::connect(fwd.addr).await.unwrap());
        }
        // Every connection is open; each round trip goes through its own tunnel stream.
        for round in 0..3 {
            for (index, client) in clients.iter_mut().enumerate() {
                let line = format!("connection {index} round {round}\n");
                client.write_all(line.as_bytes()).await.unwrap();
                let mut echo = vec![0u8; line.len()];
                client.read_exact(&mut echo).await.unwrap();
                assert_eq!(echo, line.as_bytes());
            }
        }
        for mut client in clients {
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }
        for _ in 0..CONNECTIONS {
            let receipt = fwd.receipts.recv().await.unwrap().verify().unwrap();
            assert_eq!(receipt.bytes_in, receipt.bytes_out);
        }
        assert_eq!(fwd.close().await, (CONNECTIONS as u64, 0));
    }

    /// A local client that leaves while the job still sends (curl stopped by `-m`, a closed
    /// browser tab on an endless stream): the job's connection is closed within seconds, not
    /// drained for a receipt that a job sending forever never gives.
    #[tokio::test]
    async fn a_local_client_that_leaves_stops_a_job_that_keeps_sending() {
        // A job that sends without end, until its connection fails.
        let job = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = job.local_addr().unwrap();
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut tcp, _) = job.accept().await.unwrap();
            let block = vec![b'x'; 64 * 1024];
            let mut sent = 0u64;
            while tcp.write_all(&block).await.is_ok() {
                sent += block.len() as u64;
            }
            let _ = ended_tx.send(sent);
        });
        let mut fwd = forwarder(target, 6, 60, 4).await;

        // The client sends its request and half-closes (as HTTP/1.0 clients do), reads a
        // little of the answer and goes away.
        let mut tcp = TcpStream::connect(fwd.addr).await.unwrap();
        tcp.write_all(b"GET /flood HTTP/1.0\r\n\r\n").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut first = vec![0; 1024 * 1024];
        tcp.read_exact(&mut first).await.unwrap();
        drop(tcp);

        let sent = tokio::time::timeout(Duration::from_secs(10), ended_rx)
            .await
            .expect("the job still sent 10 s after its local client left")
            .unwrap();
        assert!(sent >= first.len() as u64);
        assert!(
            fwd.receipts.try_recv().is_err(),
            "no receipt for a stopped stream"
        );
        // The forwarder serves on.
        assert!(!fwd.task.is_finished());
        fwd.task.abort();
    }
}
