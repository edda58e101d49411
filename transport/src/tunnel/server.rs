//! The executor side of the tunnel: the job endpoint, and one tunnel stream pumped between the
//! client and the job's TCP port.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use horde_protocol::codec::{encode_frame, from_bytes_exact};
use horde_protocol::records::ClientStreamSignature;
use horde_protocol::{Hotkey, JobId, JobReceipt, SecretKey, Signed, TunnelFrame};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument as _, debug, info, warn};

use super::wire::{DirectionDigest, FrameIn, Incoming, push_data_frames, write_data, write_frame};
use super::{
    CLIENT_END_GRACE, DATA_CHUNK, JOB_CONNECT_TIMEOUT, MAX_KEPT_RECEIPTS, MAX_TUNNEL_FRAME_LEN,
    MAX_TUNNEL_STREAMS, TunnelError,
};
use crate::codes;
use crate::endpoint::{ConfigError, EndpointConfig, HordeEndpoint, IncomingConnection};
use crate::tls::ALPN_JOB;

/// What the executor needs to serve tunnel streams for one job.
#[derive(Debug)]
pub struct TunnelContext {
    /// The job.
    pub job_id: JobId,
    /// The job key: the job endpoint's TLS identity, signs the receipts.
    pub job_key: SecretKey,
    /// The spec's client key: the only client allowed, signs `ClientEnd`.
    pub client_key: Hotkey,
    /// How each tunnel stream reaches the job's TCP port.
    pub target: Arc<dyn JobConnector>,
}

/// How the executor opens a TCP connection to the job's port for one tunnel stream: a plain
/// address (`SocketAddr` implements it), or a runner's way into the job's own network namespace.
#[async_trait::async_trait]
pub trait JobConnector: Send + Sync + std::fmt::Debug {
    /// A new connection to the job's port.
    async fn connect(&self) -> std::io::Result<TcpStream>;
}

#[async_trait::async_trait]
impl JobConnector for SocketAddr {
    async fn connect(&self) -> std::io::Result<TcpStream> {
        connect_job(*self).await
    }
}

/// What one served tunnel stream carried.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TunnelStats {
    /// The QUIC stream id (see the module docs).
    pub stream: u64,
    /// Bytes from the client to the job.
    pub bytes_in: u64,
    /// Bytes from the job to the client.
    pub bytes_out: u64,
    /// The client's verified end signature; `None` if the receipt went out after
    /// [`CLIENT_END_GRACE`] without one.
    pub client_end: Option<Signed<ClientStreamSignature>>,
    /// The receipt sent to the client.
    pub receipt: Signed<JobReceipt>,
}

/// Serves one tunnel stream: connects to the job's TCP port, pumps both directions, verifies the
/// client's `ClientEnd` and sends the job's receipt (see the module docs for the order).
///
/// On a bad frame, a bad client signature or a failure of the job connection, the stream is
/// reset and stopped with the matching code from [`codes`], the TCP connection is closed and a
/// typed error returned.
pub async fn serve_tunnel_stream(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    ctx: &TunnelContext,
) -> Result<TunnelStats, TunnelError> {
    serve_with_grace(send, recv, ctx, CLIENT_END_GRACE).await
}

async fn serve_with_grace(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    ctx: &TunnelContext,
    grace: Duration,
) -> Result<TunnelStats, TunnelError> {
    let stream = u64::from(recv.id());
    let mut frames = FrameIn::new(recv);
    // The dial may be answered by another thread (the process runner's bridge): no spin
    // would see it.
    let dialing = crate::spin::hold();
    let dialed = tokio::time::timeout(JOB_CONNECT_TIMEOUT, ctx.target.connect()).await;
    drop(dialing);
    let tcp = match dialed {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => return Err(abandon(&mut send, &mut frames, job_connect(ctx, source))),
        Err(_) => {
            let source = std::io::Error::from(std::io::ErrorKind::TimedOut);
            return Err(abandon(&mut send, &mut frames, job_connect(ctx, source)));
        }
    };
    // Small writes (an SSE token, a WebSocket frame) go out at once.
    let _ = tcp.set_nodelay(true);
    // The job's answers arrive here: this thread spins for them before it sleeps.
    crate::spin::watch(&tcp);
    // Both halves live until the receipt is out: closing the job's socket is not on its path.
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let mut inbound = DirectionDigest::new();
    let mut outbound = DirectionDigest::new();
    // The client's `ClientEnd`, its digest already matched against what arrived. Its signature
    // is checked once the receipt is out: it is the client's evidence for the executor's
    // records and changes nothing in the reply or the receipt, so it stays off their path.
    let mut client_end = None;
    // Set once `ClientEnd` is in, so the output-ended marker can wait for the receipt and go
    // out in the same packet (both pumps run in this task).
    let client_done = AtomicBool::new(false);

    let result = {
        let pump_in = pump_in(
            &mut frames,
            &mut tcp_write,
            &mut inbound,
            ctx,
            stream,
            &client_done,
        );
        let pump_out = pump_out(&mut tcp_read, &mut send, &mut outbound, &client_done);
        let grace_timer = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(pump_in, pump_out, grace_timer);
        let (mut in_done, mut out_done, mut output_end) = (false, false, None);
        loop {
            tokio::select! {
                result = &mut pump_in, if !in_done => {
                    match result {
                        Ok(signed) => client_end = Some(signed),
                        Err(error) => break Err(error),
                    }
                    in_done = true;
                    if let Some(end) = output_end.take() {
                        break Ok(end);
                    }
                }
                result = &mut pump_out, if !out_done => {
                    let end = match result {
                        Ok(end) => end,
                        Err(error) => break Err(error),
                    };
                    if in_done {
                        break Ok(end);
                    }
                    out_done = true;
                    output_end = Some(end);
                    grace_timer.as_mut().reset(tokio::time::Instant::now() + grace);
                }
                () = &mut grace_timer, if output_end.is_some() && !in_done => {
                    debug!(stream, "no ClientEnd within the grace period after the job's EOF");
                    if let Some(end) = output_end.take() {
                        break Ok(end);
                    }
                }
            }
        }
    };
    let OutputEnd { marker_sent, last } = match result {
        Ok(end) => end,
        Err(error) => return Err(abandon(&mut send, &mut frames, error)),
    };

    let receipt = Signed::sign(
        &ctx.job_key,
        &JobReceipt {
            job_id: ctx.job_id,
            stream,
            digest_in: inbound.digest(),
            digest_out: outbound.digest(),
            bytes_in: inbound.bytes,
            bytes_out: outbound.bytes,
        },
    );
    // The job's last bytes if they came with its EOF, the output-ended marker if still due,
    // and the receipt, in one write (one packet for a short exchange), then the stream's end.
    let mut ending = if marker_sent {
        Vec::new()
    } else {
        encode_frame(&TunnelFrame::Data(Vec::new()), MAX_TUNNEL_FRAME_LEN)?
    };
    ending.extend_from_slice(&encode_frame(
        &TunnelFrame::JobEnd(receipt.clone()),
        MAX_TUNNEL_FRAME_LEN,
    )?);
    let mut chunks = Vec::with_capacity(3);
    if let Some(last) = last {
        push_data_frames(last, &mut chunks);
    }
    chunks.push(Bytes::from(ending));
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(TunnelError::from_write)?;
    // Finishing after a reset by the peer fails; the receipt is written either way.
    let _ = send.finish();
    if client_end.is_none() {
        frames.stop(codes::CANCELLED);
    }
    // Let the connection send the receipt before this task checks the client's signature.
    tokio::task::yield_now().await;
    if let Some(signed) = &client_end {
        check_client_end(signed, &ctx.client_key)?;
    }
    Ok(TunnelStats {
        stream,
        bytes_in: inbound.bytes,
        bytes_out: outbound.bytes,
        client_end,
        receipt,
    })
}

/// Checks what `ClientEnd` says against what arrived: this job, this stream, the digest of
/// exactly the bytes received (`received`). Cheap: the signature is checked apart, by
/// [`check_client_end`].
fn match_client_end(
    signed: &Signed<ClientStreamSignature>,
    ctx: &TunnelContext,
    stream: u64,
    received: &DirectionDigest,
) -> Result<(), TunnelError> {
    if signed.signer() != &ctx.client_key {
        return Err(TunnelError::BadClientSignature(format!(
            "signed by {}, not the spec's client key",
            signed.signer().fmt_short()
        )));
    }
    let job_id = ctx.job_id;
    let signature: ClientStreamSignature = from_bytes_exact(signed.bytes())
        .map_err(|error| TunnelError::BadClientSignature(error.to_string()))?;
    if signature.job_id != job_id {
        return Err(TunnelError::BadClientSignature(format!(
            "signed for job {}, this is job {job_id}",
            signature.job_id
        )));
    }
    if signature.stream != stream {
        return Err(TunnelError::BadClientSignature(format!(
            "signed for stream {}, this is stream {stream}",
            signature.stream
        )));
    }
    if signature.digest_in != received.digest() {
        return Err(TunnelError::BadClientSignature(format!(
            "digest does not match the {} bytes received",
            received.bytes
        )));
    }
    Ok(())
}

/// Checks `ClientEnd`'s signature: by the spec's client key, over the bytes held.
fn check_client_end(
    signed: &Signed<ClientStreamSignature>,
    client_key: &Hotkey,
) -> Result<(), TunnelError> {
    signed
        .verify_by(client_key)
        .map(drop)
        .map_err(|error| TunnelError::BadClientSignature(error.to_string()))
}

/// Connects to the job's TCP port. On loopback the handshake is usually complete when the
/// non-blocking `connect` returns; then the connection is used at once, without the round trip
/// through the runtime's readiness events that `TcpStream::connect` always takes. Otherwise it
/// waits for writability as usual. Never blocks the thread.
async fn connect_job(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    let in_progress = match socket.connect(&addr.into()) {
        Ok(()) => false,
        Err(error)
            if error.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) =>
        {
            true
        }
        Err(error) => return Err(error),
    };
    let connected = !in_progress || socket.peer_addr().is_ok();
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    if !connected {
        stream.writable().await?;
        if let Some(error) = stream.take_error()? {
            return Err(error);
        }
        stream.peer_addr()?;
    }
    Ok(stream)
}

fn job_connect(ctx: &TunnelContext, source: std::io::Error) -> TunnelError {
    TunnelError::JobConnect {
        target: format!("{:?}", ctx.target),
        source,
    }
}

/// Resets and stops the stream with the error's code and hands the error back.
fn abandon(send: &mut quinn::SendStream, frames: &mut FrameIn, error: TunnelError) -> TunnelError {
    let code = error.error_code();
    // Either may already be closed by the peer; the code reaches it at most once anyway.
    let _ = send.reset(code);
    frames.stop(code);
    error
}

/// Client → job: forwards `Data` until `ClientEnd` arrives, checks that it names this stream
/// and what arrived, shuts down the job's input, sets `client_done` and hands `ClientEnd` back.
async fn pump_in(
    frames: &mut FrameIn,
    tcp_write: &mut tokio::net::tcp::OwnedWriteHalf,
    tally: &mut DirectionDigest,
    ctx: &TunnelContext,
    stream: u64,
    client_done: &AtomicBool,
) -> Result<Signed<ClientStreamSignature>, TunnelError> {
    let mut job_input_open = true;
    loop {
        match frames.next().await? {
            Incoming::Data(piece) => {
                tally.add(&piece);
                if job_input_open && let Err(error) = tcp_write.write_all(&piece).await {
                    // The job closed its input; what the client sends is still counted so the
                    // receipt matches what it sent, but goes nowhere.
                    debug!(stream, %error, "the job stopped reading");
                    job_input_open = false;
                }
            }
            Incoming::Empty => {}
            Incoming::ClientEnd(signed) => {
                match_client_end(&signed, ctx, stream, tally)?;
                client_done.store(true, Ordering::Relaxed);
                if job_input_open {
                    // The job may have closed already; its EOF still comes on the read half.
                    let _ = tcp_write.shutdown().await;
                }
                return Ok(signed);
            }
            Incoming::JobEnd(_) => {
                return Err(TunnelError::UnexpectedFrame("JobEnd from the client"));
            }
            Incoming::End => return Err(TunnelError::MissingClientEnd),
        }
    }
}

/// How the job's output ended, as [`pump_out`] reports it.
struct OutputEnd {
    /// The output-ended marker has been sent.
    marker_sent: bool,
    /// The job's last bytes, read together with its EOF after the client had finished: they
    /// go out in one write with the receipt (counted in `tally` already).
    last: Option<Bytes>,
}

/// Job → client: forwards the job's output until its EOF. Sends the output-ended marker then if
/// the client is still sending (a forwarder passes the EOF on while its client may go on);
/// otherwise the marker goes out with the receipt.
///
/// After each read it takes whatever else the job has already written without waiting, its EOF
/// included. When that EOF comes with the last bytes and the client has finished, those bytes
/// are kept for the receipt's write: a short reply (`Connection: close`) and its receipt then
/// reach the client in one packet rather than two.
async fn pump_out(
    tcp_read: &mut tokio::net::tcp::OwnedReadHalf,
    send: &mut quinn::SendStream,
    tally: &mut DirectionDigest,
    client_done: &AtomicBool,
) -> Result<OutputEnd, TunnelError> {
    let mut buffer = BytesMut::with_capacity(DATA_CHUNK);
    loop {
        buffer.reserve(DATA_CHUNK);
        let read = tcp_read
            .read_buf(&mut buffer)
            .await
            .map_err(TunnelError::Job)?;
        let mut at_eof = read == 0;
        while !at_eof && buffer.len() < DATA_CHUNK {
            match tcp_read.try_read_buf(&mut buffer) {
                Ok(0) => at_eof = true,
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(TunnelError::Job(error)),
            }
        }
        if !buffer.is_empty() {
            let payload = buffer.split().freeze();
            tally.add(&payload);
            if at_eof && client_done.load(Ordering::Relaxed) {
                return Ok(OutputEnd {
                    marker_sent: false,
                    last: Some(payload),
                });
            }
            write_data(send, payload).await?;
        }
        if at_eof {
            if client_done.load(Ordering::Relaxed) {
                return Ok(OutputEnd {
                    marker_sent: false,
                    last: None,
                });
            }
            write_frame(send, &TunnelFrame::Data(Vec::new())).await?;
            return Ok(OutputEnd {
                marker_sent: true,
                last: None,
            });
        }
    }
}

/// Receipts issued by a job endpoint, for the executor's logs.
#[derive(Debug, Default)]
struct ReceiptLog {
    receipts: VecDeque<Signed<JobReceipt>>,
    served: u64,
    failed: u64,
}

/// The running job endpoint started by [`serve_job_endpoint`]. Dropping it stops the endpoint.
#[derive(Debug)]
pub struct JobEndpointHandle {
    /// Cancelled when the endpoint's task has ended (the thread of
    /// [`serve_job_endpoint_on_own_thread`] runs until then).
    ended: CancellationToken,
    local_addr: Option<SocketAddr>,
    log: Arc<Mutex<ReceiptLog>>,
    /// Stops accepting connections and streams; those in flight go on.
    draining: CancellationToken,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _stop_on_drop: DropGuard,
}

impl JobEndpointHandle {
    /// The endpoint's UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The receipts issued so far (the last [`MAX_KEPT_RECEIPTS`]), oldest first.
    pub fn receipts(&self) -> Vec<Signed<JobReceipt>> {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.receipts.iter().cloned().collect()
    }

    /// The receipts issued so far once there are at least `count`, waiting up to 5 s for them
    /// (the endpoint logs a receipt after sending it, so its client may hold it first); fewer
    /// when the wait ran out.
    #[cfg(any(test, feature = "test-utils"))]
    pub async fn receipts_at_least(&self, count: usize) -> Vec<Signed<JobReceipt>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let receipts = self.receipts();
            if receipts.len() >= count || tokio::time::Instant::now() >= deadline {
                return receipts;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Streams that ended with a receipt, and streams that failed.
    pub fn stream_counts(&self) -> (u64, u64) {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        (log.served, log.failed)
    }

    /// Stops accepting connections and streams, lets the streams in flight end (each with its
    /// receipt) for up to `grace`, then closes as [`JobEndpointHandle::shutdown`] does. For a
    /// job that has ended: a reply it wrote just before exiting still reaches the client.
    /// Returns the final [`JobEndpointHandle::stream_counts`].
    pub async fn drain(mut self, grace: Duration) -> (u64, u64) {
        self.draining.cancel();
        if tokio::time::timeout(grace, &mut self.task).await.is_ok() {
            return self.stream_counts();
        }
        debug!("streams still open after the drain grace; closing");
        self.shutdown().await
    }

    /// Closes every connection with [`codes::SHUTDOWN`] and waits for the endpoint's tasks.
    /// Returns the final [`JobEndpointHandle::stream_counts`].
    pub async fn shutdown(mut self) -> (u64, u64) {
        self.cancel.cancel();
        // The task never panics on peer input; a panic has been logged by the runtime.
        let _ = (&mut self.task).await;
        self.stream_counts()
    }
}

/// Serves a job endpoint: accepts connections (the endpoint's TLS policy already admits only the
/// spec's client key, checked again here), and serves each bidirectional stream with
/// [`serve_tunnel_stream`], at most [`MAX_TUNNEL_STREAMS`] at once.
///
/// Runs until `cancel` fires or the handle is dropped; must be called inside a tokio runtime.
pub fn serve_job_endpoint(
    endpoint: HordeEndpoint,
    ctx: Arc<TunnelContext>,
    cancel: CancellationToken,
) -> JobEndpointHandle {
    let local_addr = endpoint.local_addr().ok();
    let log = Arc::new(Mutex::new(ReceiptLog::default()));
    let span = tracing::info_span!("job endpoint", job = %ctx.job_id.fmt_short());
    let draining = cancel.child_token();
    let (draining_for_task, cancel_for_task) = (draining.clone(), cancel.clone());
    let log_for_task = Arc::clone(&log);
    let ended = CancellationToken::new();
    let ended_on_drop = ended.clone().drop_guard();
    // Owned by the handle: stopped by its token (also on drop) and awaited by its shutdown.
    let task = tokio::spawn(
        async move {
            let _ended = ended_on_drop;
            run_job_endpoint(
                endpoint,
                ctx,
                Stop {
                    draining: draining_for_task,
                    cancel: cancel_for_task,
                },
                log_for_task,
            )
            .await;
        }
        .instrument(span),
    );
    JobEndpointHandle {
        ended,
        local_addr,
        log,
        draining,
        _stop_on_drop: cancel.clone().drop_guard(),
        cancel,
        task,
    }
}

/// How long the thread of [`serve_job_endpoint_on_own_thread`] lets quinn send the closes of
/// the endpoint's connections once its task has ended (a close is one packet; on a path that
/// loses it the peer's idle timeout or a stateless reset ends the connection anyway).
const OWN_THREAD_CLOSE_GRACE: Duration = Duration::from_millis(200);

/// Binds a job endpoint and serves it as [`serve_job_endpoint`] does, on a thread of its own
/// with a current-thread runtime: the UDP socket, quinn's endpoint and connection drivers, the
/// tunnel streams and their TCP connections to the job all run on that one thread, as
/// `horde job forward` runs on one. On the shared multi-thread runtime a packet's hand-offs
/// (socket → endpoint driver → connection driver → stream task) can land on different workers,
/// each crossing a futex wake of a parked thread; measured on a 2-core VM, a parked worker woke
/// for the UDP read of every round trip. The job's TCP connections must be registered with this
/// runtime: [`JobConnector::connect`] is called on it and must create its stream there.
///
/// The thread runs until the endpoint's task has ended (a [`JobEndpointHandle::drain`],
/// [`JobEndpointHandle::shutdown`], `cancel` or a dropped handle), then lets the connections'
/// closes go out for up to 200 ms. Call inside a tokio runtime, like [`serve_job_endpoint`]:
/// the handle is awaited from the caller's.
pub fn serve_job_endpoint_on_own_thread(
    key: &SecretKey,
    config: EndpointConfig,
    ctx: Arc<TunnelContext>,
    cancel: CancellationToken,
) -> Result<JobEndpointHandle, ConfigError> {
    crate::spin::enable(crate::spin::configured_window());
    // Between streams nothing is near: the CPU is left to those making the next one.
    crate::spin::only_while_relaying();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(crate::spin::before_park)
        .build()
        .map_err(ConfigError::Thread)?;
    let (handle, quinn_endpoint) = {
        let _entered = runtime.enter();
        let endpoint = HordeEndpoint::bind(key, config)?;
        let quinn_endpoint = endpoint.quinn().clone();
        (serve_job_endpoint(endpoint, ctx, cancel), quinn_endpoint)
    };
    let ended = handle.ended.clone();
    let addr = handle
        .local_addr
        .map_or_else(String::new, |addr| addr.to_string());
    std::thread::Builder::new()
        .name("job-endpoint".to_owned())
        .spawn(move || {
            runtime.block_on(async {
                ended.cancelled().await;
                let _ =
                    tokio::time::timeout(OWN_THREAD_CLOSE_GRACE, quinn_endpoint.wait_idle()).await;
            });
            debug!(endpoint = %addr, "job endpoint thread done");
        })
        .map_err(ConfigError::Thread)?;
    Ok(handle)
}

/// How a job endpoint stops: `draining` ends accepting (what is in flight goes on), `cancel`
/// closes everything at once. Cancelling `cancel` also cancels `draining`.
#[derive(Clone, Debug)]
struct Stop {
    draining: CancellationToken,
    cancel: CancellationToken,
}

impl Stop {
    fn child(&self) -> Self {
        Self {
            draining: self.draining.child_token(),
            cancel: self.cancel.child_token(),
        }
    }
}

async fn run_job_endpoint(
    endpoint: HordeEndpoint,
    ctx: Arc<TunnelContext>,
    stop: Stop,
    log: Arc<Mutex<ReceiptLog>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_TUNNEL_STREAMS));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.draining.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = endpoint.accept() => accepted,
        };
        match accepted {
            None => break,
            Some(Err(error)) => debug!(%error, "refused a connection"),
            Some(Ok(IncomingConnection {
                connection,
                peer: client,
                alpn,
            })) => {
                if client != ctx.client_key || alpn != ALPN_JOB {
                    warn!(client = %client.fmt_short(), "not this job's client; closing");
                    connection.close(codes::NOT_ALLOWED, b"not this job's client");
                    continue;
                }
                let span = tracing::debug_span!("client", remote = %connection.remote_address());
                connections.spawn(
                    serve_connection(
                        connection,
                        Arc::clone(&ctx),
                        stop.child(),
                        Arc::clone(&slots),
                        Arc::clone(&log),
                    )
                    .instrument(span),
                );
            }
        }
    }
    // Draining: the connections end once their streams have (or all at once on `cancel`).
    while connections.join_next().await.is_some() {}
    endpoint.close(codes::SHUTDOWN, b"job endpoint closed");
}

async fn serve_connection(
    connection: quinn::Connection,
    ctx: Arc<TunnelContext>,
    stop: Stop,
    slots: Arc<Semaphore>,
    log: Arc<Mutex<ReceiptLog>>,
) {
    let mut streams = JoinSet::new();
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.draining.cancelled() => break,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            () = stop.draining.cancelled() => break,
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
            accepted = connection.accept_bi() => accepted,
        };
        let (send, recv) = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                debug!(%error, "connection ended");
                break;
            }
        };
        let ctx = Arc::clone(&ctx);
        let log = Arc::clone(&log);
        let stream = u64::from(recv.id());
        streams.spawn(
            async move {
                // This process spins for its answers while a stream is served.
                let relaying = crate::spin::relaying();
                let result = serve_tunnel_stream(send, recv, &ctx).await;
                drop(relaying);
                drop(permit);
                let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                match result {
                    Ok(stats) => {
                        info!(
                            bytes_in = stats.bytes_in,
                            bytes_out = stats.bytes_out,
                            client_signed = stats.client_end.is_some(),
                            "tunnel stream done, receipt issued"
                        );
                        log.served += 1;
                        if log.receipts.len() == MAX_KEPT_RECEIPTS {
                            log.receipts.pop_front();
                        }
                        log.receipts.push_back(stats.receipt);
                    }
                    Err(error) => {
                        warn!(%error, "tunnel stream failed");
                        log.failed += 1;
                    }
                }
            }
            .instrument(tracing::debug_span!("tunnel", stream)),
        );
    }
    // The streams in flight end with their receipts, unless `cancel` cuts them short.
    let cut_short = loop {
        tokio::select! {
            biased;
            () = stop.cancel.cancelled() => break true,
            next = streams.join_next() => if next.is_none() {
                break false;
            },
        }
    };
    if cut_short || stop.draining.is_cancelled() {
        connection.close(codes::SHUTDOWN, b"job endpoint closed");
    }
    streams.shutdown().await;
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::tunnel::JobTunnel;

    #[tokio::test]
    async fn receipt_after_the_grace_period_when_the_client_never_ends() {
        use crate::test_utils::{localhost_endpoint, seeded_key};
        use crate::{ClientPolicy, EndpointConfig};

        // A job that reads five bytes, answers and closes on its own.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 5];
            tcp.read_exact(&mut request).await.unwrap();
            tcp.write_all(b"bye").await.unwrap();
        });
        let (client_key, job_key) = (seeded_key(20), seeded_key(21));
        let config = EndpointConfig::new("127.0.0.1:0".parse().unwrap(), &[ALPN_JOB])
            .with_client_policy(ClientPolicy::Only(client_key.hotkey()));
        let server = HordeEndpoint::bind(&job_key, config).unwrap();
        let addr = server.local_addr().unwrap();
        let ctx = TunnelContext {
            job_id: JobId([5; 16]),
            job_key: job_key.clone(),
            client_key: client_key.hotkey(),
            target: Arc::new(target),
        };
        let serve = tokio::spawn(async move {
            let connection = server.accept().await.unwrap().unwrap().connection;
            let (send, recv) = connection.accept_bi().await.unwrap();
            let result = serve_with_grace(send, recv, &ctx, Duration::from_millis(200)).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
            result
        });
        let client = localhost_endpoint(&client_key);
        let connection = client
            .connect(addr, &job_key.hotkey(), ALPN_JOB)
            .await
            .unwrap();
        let mut tunnel = JobTunnel::new(
            connection.clone(),
            JobId([5; 16]),
            client_key,
            job_key.hotkey(),
        )
        .unwrap()
        .open()
        .await
        .unwrap();
        tunnel.write(b"hello").await.unwrap();
        // No finish_sending: the receipt comes after the grace period anyway, and verifies
        // because nothing was in flight.
        assert_eq!(&tunnel.read().await.unwrap().unwrap()[..], b"bye");
        assert!(tunnel.read().await.unwrap().is_none());
        assert!(tunnel.reader.output_ended());
        let receipt = tunnel.receipt().unwrap().verify().unwrap();
        assert_eq!((receipt.bytes_in, receipt.bytes_out), (5, 3));
        connection.close(codes::SHUTDOWN, b"");
        let stats = serve.await.unwrap().unwrap();
        assert!(stats.client_end.is_none());
    }

    fn client_end(
        key: &SecretKey,
        job_id: JobId,
        stream: u64,
        digest_in: [u8; 32],
    ) -> Signed<ClientStreamSignature> {
        Signed::sign(
            key,
            &ClientStreamSignature {
                job_id,
                stream,
                digest_in,
            },
        )
    }

    #[test]
    fn client_end_must_name_this_job_stream_and_bytes() {
        let client = SecretKey::from_seed(&[1; 32]);
        let ctx = TunnelContext {
            job_id: JobId([5; 16]),
            job_key: SecretKey::from_seed(&[2; 32]),
            client_key: client.hotkey(),
            target: Arc::new("127.0.0.1:1".parse::<SocketAddr>().unwrap()),
        };
        let mut received = DirectionDigest::new();
        received.add(b"request");
        let digest = received.digest();
        let good = client_end(&client, ctx.job_id, 8, digest);
        match_client_end(&good, &ctx, 8, &received).unwrap();
        check_client_end(&good, &ctx.client_key).unwrap();
        for (signed, what) in [
            (client_end(&client, JobId([6; 16]), 8, digest), "job"),
            (client_end(&client, ctx.job_id, 4, digest), "stream"),
            (client_end(&client, ctx.job_id, 8, [0; 32]), "digest"),
            (client_end(&ctx.job_key, ctx.job_id, 8, digest), "signer"),
        ] {
            let error = match_client_end(&signed, &ctx, 8, &received).unwrap_err();
            assert!(
                matches!(error, TunnelError::BadClientSignature(_)),
                "{what}: {error}"
            );
            assert_eq!(error.error_code(), codes::PROTOCOL_VIOLATION);
        }
        // A signature over other bytes than those held fails the late check.
        let forged = Signed::<ClientStreamSignature>::from_parts(
            good.bytes().to_vec(),
            client.hotkey(),
            *client_end(&client, ctx.job_id, 4, digest).signature(),
        );
        match_client_end(&forged, &ctx, 8, &received).unwrap();
        assert!(matches!(
            check_client_end(&forged, &ctx.client_key),
            Err(TunnelError::BadClientSignature(_))
        ));
    }

    /// A connector that records the thread each connection was made on.
    #[derive(Debug)]
    struct RecordingConnector {
        target: SocketAddr,
        threads: Mutex<Vec<Option<String>>>,
    }

    #[async_trait::async_trait]
    impl JobConnector for RecordingConnector {
        async fn connect(&self) -> std::io::Result<TcpStream> {
            let thread = std::thread::current().name().map(str::to_owned);
            self.threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(thread);
            connect_job(self.target).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_endpoint_on_its_own_thread_serves_streams_there() {
        use crate::ClientPolicy;
        use crate::test_utils::{localhost_endpoint, seeded_key};

        // A job that answers one HTTP request per connection.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = vec![0u8; 1024];
                    let _ = tcp.read(&mut request).await;
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                });
            }
        });
        let (client_key, job_key) = (seeded_key(30), seeded_key(31));
        let connector = Arc::new(RecordingConnector {
            target,
            threads: Mutex::new(Vec::new()),
        });
        let handle = serve_job_endpoint_on_own_thread(
            &job_key,
            EndpointConfig::new("127.0.0.1:0".parse().unwrap(), &[ALPN_JOB])
                .with_client_policy(ClientPolicy::Only(client_key.hotkey())),
            Arc::new(TunnelContext {
                job_id: JobId([7; 16]),
                job_key: job_key.clone(),
                client_key: client_key.hotkey(),
                target: Arc::clone(&connector) as Arc<dyn JobConnector>,
            }),
            CancellationToken::new(),
        )
        .unwrap();
        let addr = handle.local_addr().unwrap();
        let connection = localhost_endpoint(&client_key)
            .connect(addr, &job_key.hotkey(), ALPN_JOB)
            .await
            .unwrap();
        let tunnel = JobTunnel::new(
            connection.clone(),
            JobId([7; 16]),
            client_key,
            job_key.hotkey(),
        )
        .unwrap();
        for _ in 0..3 {
            let response = crate::tunnel::http_request(&tunnel, "GET", "/health", b"")
                .await
                .unwrap();
            assert_eq!((response.status, &response.body[..]), (200, &b"ok"[..]));
            response.receipt.verify().unwrap();
        }
        let threads = connector
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        assert_eq!(threads, vec![Some("job-endpoint".to_owned()); 3]);
        assert_eq!(handle.receipts_at_least(3).await.len(), 3);
        assert_eq!(handle.shutdown().await, (3, 0));
        // The endpoint closed every connection as it stopped.
        tokio::time::timeout(Duration::from_secs(5), connection.closed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_job_resets_the_stream_with_internal() {
        // A port nothing listens on.
        let target = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let (tunnel, handle) = crate::test_utils::job_tunnel(target, 7, 22).await;
        let mut stream = tunnel.open().await.unwrap();
        stream.write(b"hello").await.unwrap();
        let error = stream.read().await.unwrap_err();
        assert!(
            matches!(error, TunnelError::Reset(code) if code == codes::INTERNAL),
            "{error}"
        );
        assert_eq!(handle.shutdown().await, (0, 1));
    }
}
