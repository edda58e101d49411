//! The job tunnel (`horde/job/1`): one bidirectional QUIC stream per client TCP connection,
//! carrying the bytes between a client and the job's local TCP port, and ending with signatures
//! from both sides over what passed.
//!
//! **Wire.** Each direction of a tunnel stream is a sequence of [`TunnelFrame`]s in the protocol
//! codec (`u32` big-endian length + postcard body, at most [`MAX_TUNNEL_FRAME_LEN`]). `Data`
//! frames are written as a header (length, postcard tag, postcard length prefix) followed by the
//! payload, and read without copying the payload (quinn's chunks are handed out as [`Bytes`]).
//!
//! **Stream id convention.** The `stream` field of [`ClientStreamSignature`] and [`JobReceipt`]
//! is the full QUIC stream id, `u64::from(stream.id())` (it includes the initiator and direction
//! bits: the client's bidirectional streams are 0, 4, 8, …). Both sides read the same number
//! from their half of the stream.
//!
//! **Ending a stream.**
//! - The client sends `Data` frames, then `ClientEnd` (its signature over the job id, the stream
//!   id and the BLAKE3 digest of every byte it sent), then finishes its side. It lets the data go
//!   out before it signs, so the job starts on a request while the signature is made.
//! - The executor ([`serve_tunnel_stream`]) forwards client bytes to the job over TCP. When
//!   `ClientEnd` arrives it checks at once what costs nothing: the signer is the spec's client
//!   key, and the job, stream and digest are this stream's and what arrived (a mismatch resets
//!   the stream, [`TunnelError::BadClientSignature`]); then it shuts down the TCP write half. It
//!   forwards the job's output until the job closes TCP (EOF). Then it sends an **empty `Data`
//!   frame** (the *output-ended marker*: the job will send nothing more, so a forwarder can pass
//!   the EOF on to its local client) — at once if the client is still sending, otherwise in the
//!   same write as the receipt. Once both the job's EOF and `ClientEnd` are in, it sends
//!   `JobEnd` (the receipt, signed by the job key) and finishes. Only then does it check
//!   `ClientEnd`'s signature: the receipt attests what the executor itself forwarded and does
//!   not depend on it, so the check stays off the reply's path; a signature that does not verify
//!   fails the stream in the executor's records (the error, and no receipt logged as served).
//! - If the job closes first and `ClientEnd` does not arrive within [`CLIENT_END_GRACE`] of the
//!   job's EOF, the executor sends the receipt anyway, with the digest of what it had received,
//!   and stops reading. In the normal case (a client that finishes after reading the response,
//!   or before) the receipt always arrives before the stream ends.
//! - The client ([`TunnelStream::read`]) verifies the receipt: signed by the pinned job key, same
//!   job id and stream id, `digest_in`/`bytes_in` equal to what it sent and
//!   `digest_out`/`bytes_out` equal to what it received. Any mismatch is
//!   [`TunnelError::BadReceipt`]; a stream that ends without one is
//!   [`TunnelError::MissingReceipt`].
//!
//! Entry points: [`serve_job_endpoint`] / [`serve_tunnel_stream`] (executor side); on the client,
//! [`JobTunnel`] (a job connection whose peer was checked once against the pinned job key) opens
//! [`TunnelStream`]s, [`http_request`] sends one HTTP/1.1 request through one stream, and
//! [`forward_tcp`] tunnels a local TCP port to the job.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use horde_protocol::codec::{
    FRAME_HEADER_LEN, FrameError, MAX_FRAME_LEN, encode_frame, frame_len, from_bytes_exact,
};
use horde_protocol::records::ClientStreamSignature;
use horde_protocol::{Hotkey, HotkeyVerifier, JobId, JobReceipt, SecretKey, Signed, TunnelFrame};
use quinn::VarInt;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument as _, debug, info, warn};

use crate::codes;
use crate::endpoint::HordeEndpoint;
use crate::tls::{ALPN_JOB, remote_hotkey};

/// The largest tunnel frame accepted: a full [`MAX_FRAME_LEN`] `Data` payload plus its postcard
/// tag and length prefix.
pub const MAX_TUNNEL_FRAME_LEN: u32 = MAX_FRAME_LEN + 16;

/// The largest `Data` payload we send. Large enough that framing costs nothing next to the
/// payload, small enough that a frame never waits long for flow-control credit.
pub const DATA_CHUNK: usize = 256 * 1024;

/// How long the executor waits for the client's `ClientEnd` after the job closed its side before
/// it sends the receipt with what it received so far.
pub const CLIENT_END_GRACE: Duration = Duration::from_secs(5);

/// How long [`JobEndpointHandle::drain`] lets the streams in flight run once the job has ended:
/// a stream ends as soon as the job's side has closed and the client has sent `ClientEnd`,
/// and at most [`CLIENT_END_GRACE`] after the job's side closed; one more second covers
/// sending the receipt.
pub const DRAIN_GRACE: Duration = Duration::from_secs(CLIENT_END_GRACE.as_secs() + 1);

/// How long connecting to the job's local TCP port may take.
pub const JOB_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Tunnel streams served at once by one job endpoint, over all its connections. Further streams
/// wait for a slot (quinn's per-connection stream limit applies as well).
pub const MAX_TUNNEL_STREAMS: usize = 256;

/// Local TCP connections [`forward_tcp`] tunnels at once; further ones wait to be accepted.
pub const MAX_FORWARDED_CONNECTIONS: usize = 256;

/// Receipts a [`JobEndpointHandle`] keeps (the oldest are dropped first): the executor logs them,
/// it does not need every one in memory.
pub const MAX_KEPT_RECEIPTS: usize = 4096;

/// The largest response [`http_request`] buffers.
pub const MAX_HTTP_RESPONSE: usize = 256 * 1024 * 1024;

/// Non-`Data` frames (`ClientEnd`, `JobEnd`) are a few hundred bytes; anything much larger is
/// refused before it is buffered.
const MAX_END_FRAME_LEN: usize = 4096;

/// postcard's variant index of [`TunnelFrame::Data`].
const DATA_TAG: u8 = 0;

/// Bytes read from a tunnel stream at a time (at most): large enough that a busy stream is
/// forwarded in few large writes.
const READ_BUFFER: usize = 256 * 1024;

/// A `Data` payload length prefix (postcard varint) never needs more than 5 bytes below 4 GiB.
const MAX_VARINT_LEN: usize = 5;

/// A tunnel stream failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// A frame was refused: empty, over the cap, truncated, or undecodable.
    #[error("bad tunnel frame: {0}")]
    Frame(#[from] FrameError),
    /// A frame the protocol does not allow at this point (e.g. `JobEnd` from the client).
    #[error("unexpected frame: {0}")]
    UnexpectedFrame(&'static str),
    /// The client's `ClientEnd` does not verify under the spec's client key or does not match
    /// the stream.
    #[error("the client's end-of-stream signature is invalid: {0}")]
    BadClientSignature(String),
    /// The client finished its side without sending `ClientEnd`.
    #[error("the client finished the stream without signing what it sent")]
    MissingClientEnd,
    /// The job's receipt does not verify or does not match what passed.
    #[error("bad receipt: {0}")]
    BadReceipt(String),
    /// The stream ended without a receipt.
    #[error("the tunnel stream ended without a receipt")]
    MissingReceipt,
    /// The connection's peer is not the pinned job key.
    #[error("the connection's peer is {actual}, not the job key {expected}")]
    WrongJobKey {
        /// The pinned job key.
        expected: Hotkey,
        /// What the connection presented.
        actual: String,
    },
    /// The peer reset its side of the stream.
    #[error("stream reset by the peer (code {0})")]
    Reset(VarInt),
    /// The peer stopped reading the stream.
    #[error("stream stopped by the peer (code {0})")]
    Stopped(VarInt),
    /// The connection was lost or closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Reading the stream failed otherwise.
    #[error("reading the tunnel stream: {0}")]
    Read(quinn::ReadError),
    /// Writing the stream failed otherwise.
    #[error("writing the tunnel stream: {0}")]
    Write(quinn::WriteError),
    /// Reading the stream failed with an error quinn did not type.
    #[error("reading the tunnel stream: {0}")]
    StreamIo(std::io::Error),
    /// Writing after `finish_sending`.
    #[error("the stream was already finished")]
    Finished,
    /// The job's TCP port could not be reached.
    #[error("connecting to the job at {target}: {source}")]
    JobConnect {
        /// How the job was to be reached (its address, or the runner's dialer).
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// Reading from the job's TCP connection failed.
    #[error("job connection: {0}")]
    Job(std::io::Error),
    /// The local TCP side of a forwarder failed.
    #[error("local connection: {0}")]
    Local(std::io::Error),
    /// An HTTP request could not be made or its response could not be parsed.
    #[error("HTTP: {0}")]
    Http(String),
}

impl TunnelError {
    /// quinn's `AsyncRead` wraps its typed `ReadError` in an `io::Error`; unwrap it again.
    fn from_io(error: std::io::Error) -> Self {
        match error.downcast::<quinn::ReadError>() {
            Ok(read) => Self::from_read(read),
            Err(error) => Self::StreamIo(error),
        }
    }

    fn from_read(error: quinn::ReadError) -> Self {
        match error {
            quinn::ReadError::Reset(code) => Self::Reset(code),
            quinn::ReadError::ConnectionLost(error) => Self::Connection(error),
            other => Self::Read(other),
        }
    }

    fn from_write(error: quinn::WriteError) -> Self {
        match error {
            quinn::WriteError::Stopped(code) => Self::Stopped(code),
            quinn::WriteError::ConnectionLost(error) => Self::Connection(error),
            other => Self::Write(other),
        }
    }

    /// The application error code a stream is reset or stopped with after this error.
    pub fn error_code(&self) -> VarInt {
        match self {
            Self::Frame(FrameError::TooLarge { .. }) => codes::FRAME_TOO_LARGE,
            Self::Frame(_)
            | Self::UnexpectedFrame(_)
            | Self::BadClientSignature(_)
            | Self::MissingClientEnd
            | Self::BadReceipt(_)
            | Self::MissingReceipt => codes::PROTOCOL_VIOLATION,
            Self::JobConnect { .. } | Self::Job(_) => codes::INTERNAL,
            _ => codes::CANCELLED,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// Encodes `value` as a postcard varint into `out`, returning its length.
fn encode_varint(mut value: usize, out: &mut [u8; MAX_VARINT_LEN]) -> usize {
    let mut len = 0;
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out[len] = byte;
            return len + 1;
        }
        out[len] = byte | 0x80;
        len += 1;
    }
}

/// The bytes preceding a `Data` payload of `len` bytes (`len` ≤ [`DATA_CHUNK`]): frame length,
/// postcard tag, postcard length prefix. Header + payload is exactly the codec's encoding of
/// `TunnelFrame::Data(payload)`.
fn data_header(len: usize) -> Bytes {
    let mut varint = [0u8; MAX_VARINT_LEN];
    let varint_len = encode_varint(len, &mut varint);
    let body_len = 1 + varint_len + len;
    let mut header = Vec::with_capacity(FRAME_HEADER_LEN + 1 + varint_len);
    header.extend_from_slice(&(body_len as u32).to_be_bytes());
    header.push(DATA_TAG);
    header.extend_from_slice(&varint[..varint_len]);
    Bytes::from(header)
}

/// Appends `payload` to `chunks` as `Data` frames of at most [`DATA_CHUNK`] bytes (header,
/// piece, header, piece, …), without copying it.
fn push_data_frames(mut payload: Bytes, chunks: &mut Vec<Bytes>) {
    while !payload.is_empty() {
        let piece = payload.split_to(payload.len().min(DATA_CHUNK));
        chunks.push(data_header(piece.len()));
        chunks.push(piece);
    }
}

/// Writes `payload` as `Data` frames of at most [`DATA_CHUNK`] bytes, without copying it.
async fn write_data(send: &mut quinn::SendStream, payload: Bytes) -> Result<(), TunnelError> {
    let mut chunks = Vec::with_capacity(2);
    push_data_frames(payload, &mut chunks);
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(TunnelError::from_write)
}

/// Writes one whole frame (used for the end frames and the output-ended marker).
async fn write_frame(send: &mut quinn::SendStream, frame: &TunnelFrame) -> Result<(), TunnelError> {
    let bytes = encode_frame(frame, MAX_TUNNEL_FRAME_LEN)?;
    send.write_all(&bytes)
        .await
        .map_err(TunnelError::from_write)
}

/// What [`FrameIn::next`] read.
enum Incoming {
    /// A piece of a `Data` payload (a payload may arrive in several pieces).
    Data(Bytes),
    /// An empty `Data` frame: from the executor, the output-ended marker.
    Empty,
    ClientEnd(Signed<ClientStreamSignature>),
    JobEnd(Signed<JobReceipt>),
    /// The peer finished the stream at a frame boundary.
    End,
}

/// Reads tunnel frames from a QUIC stream.
///
/// Bytes are read in batches of up to [`READ_BUFFER`] (one read gathers every packet quinn has
/// buffered, so a busy stream costs one TCP write per batch rather than one per packet), and
/// `Data` payloads are handed out as zero-copy slices of that buffer.
///
/// Not cancel-safe: a read dropped in the middle of a frame header desynchronizes the stream.
struct FrameIn {
    recv: quinn::RecvStream,
    /// Bytes received but not consumed yet.
    buffer: BytesMut,
    /// Payload bytes of the current `Data` frame not handed out yet.
    data_left: usize,
}

impl FrameIn {
    fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            buffer: BytesMut::new(),
            data_left: 0,
        }
    }

    /// Up to `max` bytes, or `None` at the end of the stream.
    async fn take(&mut self, max: usize) -> Result<Option<Bytes>, TunnelError> {
        if self.buffer.is_empty() {
            self.buffer.reserve(READ_BUFFER);
            let read = self
                .recv
                .read_buf(&mut self.buffer)
                .await
                .map_err(TunnelError::from_io)?;
            if read == 0 {
                return Ok(None);
            }
        }
        let len = max.min(self.buffer.len());
        Ok(Some(self.buffer.split_to(len).freeze()))
    }

    /// Fills `out` as far as the stream allows, returning how many bytes were filled.
    async fn fill(&mut self, out: &mut [u8]) -> Result<usize, TunnelError> {
        let mut filled = 0;
        while filled < out.len() {
            match self.take(out.len() - filled).await? {
                Some(piece) => {
                    out[filled..filled + piece.len()].copy_from_slice(&piece);
                    filled += piece.len();
                }
                None => break,
            }
        }
        Ok(filled)
    }

    async fn fill_exact(&mut self, out: &mut [u8]) -> Result<(), TunnelError> {
        let filled = self.fill(out).await?;
        if filled < out.len() {
            return Err(FrameError::Truncated {
                needed: out.len() - filled,
            }
            .into());
        }
        Ok(())
    }

    /// Reads the postcard length prefix of a `Data` payload within a body of `body_left` bytes;
    /// returns the length and the prefix's size.
    async fn read_varint(&mut self, body_left: usize) -> Result<(usize, usize), TunnelError> {
        let mut value = 0usize;
        for index in 0..MAX_VARINT_LEN.min(body_left) {
            let mut byte = [0u8; 1];
            self.fill_exact(&mut byte).await?;
            value |= usize::from(byte[0] & 0x7f) << (7 * index);
            if byte[0] & 0x80 == 0 {
                return Ok((value, index + 1));
            }
        }
        Err(malformed("bad Data length prefix"))
    }

    async fn next(&mut self) -> Result<Incoming, TunnelError> {
        if self.data_left > 0 {
            let Some(piece) = self.take(self.data_left).await? else {
                return Err(FrameError::Truncated {
                    needed: self.data_left,
                }
                .into());
            };
            self.data_left -= piece.len();
            return Ok(Incoming::Data(piece));
        }
        let mut header = [0u8; FRAME_HEADER_LEN];
        match self.fill(&mut header).await? {
            0 => return Ok(Incoming::End),
            FRAME_HEADER_LEN => {}
            filled => {
                return Err(FrameError::Truncated {
                    needed: FRAME_HEADER_LEN - filled,
                }
                .into());
            }
        }
        let len = frame_len(header, MAX_TUNNEL_FRAME_LEN)?;
        let mut tag = [0u8; 1];
        self.fill_exact(&mut tag).await?;
        if tag[0] == DATA_TAG {
            let (payload_len, prefix_len) = self.read_varint(len - 1).await?;
            let used = 1 + prefix_len;
            if used + payload_len != len {
                return Err(if used + payload_len < len {
                    FrameError::Decode(horde_protocol::DecodeError::TrailingBytes(
                        len - used - payload_len,
                    ))
                    .into()
                } else {
                    malformed("Data length prefix exceeds the frame")
                });
            }
            if payload_len == 0 {
                return Ok(Incoming::Empty);
            }
            self.data_left = payload_len;
            let Some(piece) = self.take(self.data_left).await? else {
                return Err(FrameError::Truncated {
                    needed: self.data_left,
                }
                .into());
            };
            self.data_left -= piece.len();
            return Ok(Incoming::Data(piece));
        }
        if len > MAX_END_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: MAX_END_FRAME_LEN as u32,
            }
            .into());
        }
        let mut body = vec![0u8; len];
        body[0] = tag[0];
        self.fill_exact(&mut body[1..]).await?;
        match from_bytes_exact::<TunnelFrame>(&body).map_err(FrameError::from)? {
            TunnelFrame::ClientEnd(signed) => Ok(Incoming::ClientEnd(signed)),
            TunnelFrame::JobEnd(signed) => Ok(Incoming::JobEnd(signed)),
            _ => Err(TunnelError::UnexpectedFrame("an unknown tunnel frame")),
        }
    }

    fn stop(&mut self, code: VarInt) {
        // Already stopped or finished: nothing more to refuse.
        let _ = self.recv.stop(code);
    }
}

fn malformed(reason: &str) -> TunnelError {
    FrameError::Decode(horde_protocol::DecodeError::Postcard(reason.to_owned())).into()
}

// ---------------------------------------------------------------------------------------------
// Executor side
// ---------------------------------------------------------------------------------------------

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

/// One direction's running digest and byte count.
struct Tally {
    hasher: blake3::Hasher,
    bytes: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            hasher: blake3::Hasher::new(),
            bytes: 0,
        }
    }

    fn add(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
    }

    fn digest(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }
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
    let tcp = match tokio::time::timeout(JOB_CONNECT_TIMEOUT, ctx.target.connect()).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => return Err(abandon(&mut send, &mut frames, job_connect(ctx, source))),
        Err(_) => {
            let source = std::io::Error::from(std::io::ErrorKind::TimedOut);
            return Err(abandon(&mut send, &mut frames, job_connect(ctx, source)));
        }
    };
    // Small writes (an SSE token, a WebSocket frame) go out at once.
    let _ = tcp.set_nodelay(true);
    // Both halves live until the receipt is out: closing the job's socket is not on its path.
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let mut inbound = Tally::new();
    let mut outbound = Tally::new();
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
    received: &Tally,
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
    tally: &mut Tally,
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
    tally: &mut Tally,
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
    // Owned by the handle: stopped by its token (also on drop) and awaited by its shutdown.
    let task = tokio::spawn(
        run_job_endpoint(
            endpoint,
            ctx,
            Stop {
                draining: draining.clone(),
                cancel: cancel.clone(),
            },
            Arc::clone(&log),
        )
        .instrument(span),
    );
    JobEndpointHandle {
        local_addr,
        log,
        draining,
        _stop_on_drop: cancel.clone().drop_guard(),
        cancel,
        task,
    }
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
            Some(Ok((connection, client, alpn))) => {
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
                let result = serve_tunnel_stream(send, recv, &ctx).await;
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

// ---------------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------------

/// What the client sent, shared by the two halves of a stream so the reader can check the
/// receipt's `digest_in`.
type SentTally = Arc<Mutex<Tally>>;

fn lock(tally: &SentTally) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The client's side of one tunnel stream. See the module docs for the protocol.
#[derive(Debug)]
pub struct TunnelStream {
    writer: TunnelWriter,
    reader: TunnelReader,
}

/// The sending half of a [`TunnelStream`].
pub struct TunnelWriter {
    send: quinn::SendStream,
    job_id: JobId,
    stream: u64,
    client_key: SecretKey,
    sent: SentTally,
    finished: bool,
}

/// The receiving half of a [`TunnelStream`].
pub struct TunnelReader {
    frames: FrameIn,
    job_id: JobId,
    stream: u64,
    job_key: HotkeyVerifier,
    sent: SentTally,
    received: Tally,
    output_ended: bool,
    receipt: Option<Signed<JobReceipt>>,
}

impl std::fmt::Debug for TunnelWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelWriter")
            .field("job_id", &self.job_id)
            .field("stream", &self.stream)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TunnelReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelReader")
            .field("job_id", &self.job_id)
            .field("stream", &self.stream)
            .field("received", &self.received.bytes)
            .field("output_ended", &self.output_ended)
            .field("receipt", &self.receipt)
            .finish_non_exhaustive()
    }
}

/// What [`TunnelReader::next_event`] read.
enum ReaderEvent {
    Data(Bytes),
    /// The job closed its side; only the receipt is still to come.
    OutputEnded,
    /// The verified receipt arrived and the stream ended.
    Done,
}

/// A `horde/job/1` connection to a job endpoint, with the job, the per-job client key and the
/// pinned job key. [`JobTunnel::new`] checks once that the connection's peer (its TLS
/// certificate, verified at the handshake) is the pinned job key and prepares that key for
/// verifying receipts, so a stream opened afterwards costs no certificate parsing and no point
/// decompression. Cheap to clone.
#[derive(Clone)]
pub struct JobTunnel {
    connection: quinn::Connection,
    job_id: JobId,
    client_key: SecretKey,
    job_key: HotkeyVerifier,
}

impl std::fmt::Debug for JobTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTunnel")
            .field("job_id", &self.job_id)
            .field("job_key", self.job_key.hotkey())
            .field("remote", &self.connection.remote_address())
            .finish_non_exhaustive()
    }
}

impl JobTunnel {
    /// Wraps a `horde/job/1` connection to the job endpoint, whose TLS identity must be `job_key`
    /// (the key pinned from the verified endpoint record); [`TunnelError::WrongJobKey`] otherwise.
    pub fn new(
        connection: quinn::Connection,
        job_id: JobId,
        client_key: SecretKey,
        job_key: Hotkey,
    ) -> Result<Self, TunnelError> {
        let wrong = |actual: String| TunnelError::WrongJobKey {
            expected: job_key,
            actual,
        };
        match remote_hotkey(&connection) {
            Ok(actual) if actual == job_key => {}
            Ok(actual) => return Err(wrong(actual.to_string())),
            Err(error) => return Err(wrong(error.to_string())),
        }
        let job_key = job_key
            .verifier()
            .map_err(|error| wrong(error.to_string()))?;
        Ok(Self {
            connection,
            job_id,
            client_key,
            job_key,
        })
    }

    /// The QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// The job.
    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    /// The pinned job key.
    pub fn job_key(&self) -> Hotkey {
        *self.job_key.hotkey()
    }

    /// Opens a tunnel stream to the job.
    pub async fn open(&self) -> Result<TunnelStream, TunnelError> {
        let (send, recv) = self.connection.open_bi().await?;
        let stream = u64::from(send.id());
        let sent = Arc::new(Mutex::new(Tally::new()));
        Ok(TunnelStream {
            writer: TunnelWriter {
                send,
                job_id: self.job_id,
                stream,
                client_key: self.client_key.clone(),
                sent: Arc::clone(&sent),
                finished: false,
            },
            reader: TunnelReader {
                frames: FrameIn::new(recv),
                job_id: self.job_id,
                stream,
                job_key: self.job_key,
                sent,
                received: Tally::new(),
                output_ended: false,
                receipt: None,
            },
        })
    }
}

impl TunnelStream {
    /// The QUIC stream id, as signed in `ClientEnd` and the receipt.
    pub fn id(&self) -> u64 {
        self.writer.stream
    }

    /// Sends bytes to the job.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), TunnelError> {
        self.writer.write(data).await
    }

    /// Sends bytes to the job without copying them.
    pub async fn write_bytes(&mut self, data: Bytes) -> Result<(), TunnelError> {
        self.writer.write_bytes(data).await
    }

    /// Signs what was sent, sends `ClientEnd` and finishes the sending side.
    pub async fn finish_sending(&mut self) -> Result<(), TunnelError> {
        self.writer.finish_sending().await
    }

    /// Sends the last bytes and `ClientEnd` in one write; see [`TunnelWriter::write_last`].
    pub async fn write_last(&mut self, data: Bytes) -> Result<(), TunnelError> {
        self.writer.write_last(data).await
    }

    /// The next bytes from the job; `None` once the verified receipt has arrived and the stream
    /// ended. See [`TunnelReader::read`].
    pub async fn read(&mut self) -> Result<Option<Bytes>, TunnelError> {
        self.reader.read().await
    }

    /// The verified receipt, once [`read`](Self::read) returned `None`.
    pub fn receipt(&self) -> Option<&Signed<JobReceipt>> {
        self.reader.receipt()
    }

    /// Splits into halves usable from two tasks (full duplex).
    pub fn into_split(self) -> (TunnelWriter, TunnelReader) {
        (self.writer, self.reader)
    }
}

impl TunnelWriter {
    /// Sends bytes to the job.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), TunnelError> {
        for piece in data.chunks(DATA_CHUNK) {
            self.write_bytes(Bytes::copy_from_slice(piece)).await?;
        }
        Ok(())
    }

    /// Sends bytes to the job without copying them.
    pub async fn write_bytes(&mut self, data: Bytes) -> Result<(), TunnelError> {
        if self.finished {
            return Err(TunnelError::Finished);
        }
        lock(&self.sent).add(&data);
        write_data(&mut self.send, data).await
    }

    /// Signs what was sent (job id, stream id, BLAKE3 of the bytes), sends `ClientEnd` and
    /// finishes the sending side.
    pub async fn finish_sending(&mut self) -> Result<(), TunnelError> {
        if self.finished {
            return Err(TunnelError::Finished);
        }
        self.finished = true;
        // Let the connection send the data already written before this task spends its time on
        // the signature: the job can start on the request meanwhile.
        tokio::task::yield_now().await;
        let client_end = self.client_end()?;
        self.send
            .write_all(&client_end)
            .await
            .map_err(TunnelError::from_write)?;
        self.send.finish().map_err(|_| TunnelError::Finished)
    }

    /// Sends `data` as the last bytes to the job, signed at once: the bytes and `ClientEnd` go
    /// out in one write (one packet for a short request), then the sending side finishes. For a
    /// request known whole in advance (an HTTP request): the job's endpoint then knows the
    /// client is done as the request arrives, and can send the reply's last bytes together with
    /// its receipt.
    pub async fn write_last(&mut self, data: Bytes) -> Result<(), TunnelError> {
        if self.finished {
            return Err(TunnelError::Finished);
        }
        self.finished = true;
        lock(&self.sent).add(&data);
        let mut chunks = Vec::with_capacity(3);
        push_data_frames(data, &mut chunks);
        chunks.push(Bytes::from(self.client_end()?));
        self.send
            .write_all_chunks(&mut chunks)
            .await
            .map_err(TunnelError::from_write)?;
        self.send.finish().map_err(|_| TunnelError::Finished)
    }

    /// The encoded `ClientEnd` frame over everything sent so far.
    fn client_end(&self) -> Result<Vec<u8>, TunnelError> {
        let digest_in = lock(&self.sent).digest();
        let signature = Signed::sign(
            &self.client_key,
            &ClientStreamSignature {
                job_id: self.job_id,
                stream: self.stream,
                digest_in,
            },
        );
        Ok(encode_frame(
            &TunnelFrame::ClientEnd(signature),
            MAX_TUNNEL_FRAME_LEN,
        )?)
    }

    /// Abandons the sending side with an application error code.
    pub fn reset(&mut self, code: VarInt) {
        self.finished = true;
        // Already finished or reset by the peer: nothing left to abandon.
        let _ = self.send.reset(code);
    }

    /// The QUIC stream id.
    pub fn id(&self) -> u64 {
        self.stream
    }
}

impl TunnelReader {
    /// The next bytes from the job (pieces of `Data` payloads, in order, never empty); `None`
    /// once the job's receipt has arrived, been verified, and the stream ended.
    ///
    /// Errors: [`TunnelError::BadReceipt`] for a receipt that does not match, and
    /// [`TunnelError::MissingReceipt`] for a stream that ends without one. Not cancel-safe: use
    /// [`TunnelStream::into_split`] to read and write from different tasks.
    pub async fn read(&mut self) -> Result<Option<Bytes>, TunnelError> {
        loop {
            match self.next_event().await? {
                ReaderEvent::Data(bytes) => return Ok(Some(bytes)),
                ReaderEvent::OutputEnded => {}
                ReaderEvent::Done => return Ok(None),
            }
        }
    }

    /// Whether the job has closed its side (the output-ended marker arrived).
    pub fn output_ended(&self) -> bool {
        self.output_ended
    }

    /// The verified receipt, once [`read`](Self::read) returned `None`.
    pub fn receipt(&self) -> Option<&Signed<JobReceipt>> {
        self.receipt.as_ref()
    }

    /// The QUIC stream id.
    pub fn id(&self) -> u64 {
        self.stream
    }

    async fn next_event(&mut self) -> Result<ReaderEvent, TunnelError> {
        if self.receipt.is_some() {
            return Ok(ReaderEvent::Done);
        }
        let result = self.next_event_inner().await;
        if let Err(error) = &result {
            self.frames.stop(error.error_code());
        }
        result
    }

    async fn next_event_inner(&mut self) -> Result<ReaderEvent, TunnelError> {
        match self.frames.next().await? {
            Incoming::Data(bytes) => {
                self.received.add(&bytes);
                Ok(ReaderEvent::Data(bytes))
            }
            Incoming::Empty => {
                self.output_ended = true;
                Ok(ReaderEvent::OutputEnded)
            }
            Incoming::JobEnd(signed) => {
                self.verify_receipt(&signed)?;
                match self.frames.next().await? {
                    Incoming::End => {}
                    _ => return Err(TunnelError::UnexpectedFrame("a frame after the receipt")),
                }
                self.receipt = Some(signed);
                Ok(ReaderEvent::Done)
            }
            Incoming::ClientEnd(_) => Err(TunnelError::UnexpectedFrame("ClientEnd from the job")),
            Incoming::End => Err(TunnelError::MissingReceipt),
        }
    }

    fn verify_receipt(&self, signed: &Signed<JobReceipt>) -> Result<(), TunnelError> {
        let bad = |reason: String| Err(TunnelError::BadReceipt(reason));
        let receipt = match signed.verify_with(&self.job_key) {
            Ok(receipt) => receipt,
            Err(error) => return bad(error.to_string()),
        };
        if receipt.job_id != self.job_id {
            return bad(format!("for job {}, not {}", receipt.job_id, self.job_id));
        }
        if receipt.stream != self.stream {
            return bad(format!(
                "for stream {}, not {}",
                receipt.stream, self.stream
            ));
        }
        let (sent_bytes, sent_digest) = {
            let sent = lock(&self.sent);
            (sent.bytes, sent.digest())
        };
        if receipt.bytes_in != sent_bytes {
            return bad(format!(
                "the job counts {} bytes in, we sent {sent_bytes}",
                receipt.bytes_in
            ));
        }
        if receipt.digest_in != sent_digest {
            return bad("digest_in does not match the bytes we sent".to_owned());
        }
        if receipt.bytes_out != self.received.bytes {
            return bad(format!(
                "the job counts {} bytes out, we received {}",
                receipt.bytes_out, self.received.bytes
            ));
        }
        if receipt.digest_out != self.received.digest() {
            return bad("digest_out does not match the bytes we received".to_owned());
        }
        Ok(())
    }
}

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
        let tunnel = tunnel.clone();
        let receipts = receipts.clone();
        tasks.spawn(
            async move {
                let result = forward_connection(tcp, &tunnel, receipts).await;
                drop(permit);
                match result {
                    Ok(()) => debug!("forwarded connection done"),
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
        let mut local_open = true;
        loop {
            match reader.next_event().await? {
                ReaderEvent::Data(bytes) => {
                    if local_open && let Err(error) = local_write.write_all(&bytes).await {
                        // The local client went away; keep reading for the receipt.
                        debug!(%error, "local client stopped reading");
                        local_open = false;
                    }
                }
                ReaderEvent::OutputEnded => {
                    let _ = local_write.shutdown().await;
                }
                ReaderEvent::Done => {
                    let _ = local_write.shutdown().await;
                    return reader.receipt.clone().ok_or(TunnelError::MissingReceipt);
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

// ---------------------------------------------------------------------------------------------
// HTTP over one tunnel stream
// ---------------------------------------------------------------------------------------------

/// A job's answer to [`http_request`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names and values in order, as sent.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// The job's verified receipt for the stream.
    pub receipt: Signed<JobReceipt>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` through one tunnel stream, reads the
/// response to the end and verifies the job's receipt. Handles `Content-Length`, chunked and
/// read-to-EOF bodies.
pub async fn http_request(
    tunnel: &JobTunnel,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<HttpResponse, TunnelError> {
    let token_ok = |text: &str| !text.is_empty() && !text.bytes().any(|b| b <= b' ' || b == 0x7f);
    if !token_ok(method) || !token_ok(path) {
        return Err(TunnelError::Http(
            "method and path must be non-empty with no spaces or control characters".to_owned(),
        ));
    }
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: horde-job\r\nUser-Agent: horde\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);

    let mut tunnel = tunnel.open().await?;
    tunnel.write_last(Bytes::from(request)).await?;
    let mut response = Vec::new();
    while let Some(bytes) = tunnel.read().await? {
        if response.len() + bytes.len() > MAX_HTTP_RESPONSE {
            return Err(TunnelError::Http(format!(
                "response larger than {MAX_HTTP_RESPONSE} bytes"
            )));
        }
        response.extend_from_slice(&bytes);
    }
    let receipt = tunnel
        .receipt()
        .cloned()
        .ok_or(TunnelError::MissingReceipt)?;
    let head_only = method.eq_ignore_ascii_case("HEAD");
    let (status, headers, body) =
        parse_http_response(&response, head_only).map_err(TunnelError::Http)?;
    Ok(HttpResponse {
        status,
        headers,
        body,
        receipt,
    })
}

type ParsedResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// Parses a complete HTTP/1.x response (everything up to the connection's end).
fn parse_http_response(mut input: &[u8], head_only: bool) -> Result<ParsedResponse, String> {
    loop {
        let end = find(input, b"\r\n\r\n").ok_or("no end of the response head")?;
        let head = std::str::from_utf8(&input[..end]).map_err(|_| "response head is not UTF-8")?;
        let rest = &input[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(format!("bad status line {status_line:?}"));
        }
        let status: u16 = parts
            .next()
            .and_then(|code| code.parse().ok())
            .filter(|code| (100..1000).contains(code))
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("bad header line {line:?}"))?;
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        if (100..200).contains(&status) && status != 101 {
            // An interim response (100 Continue); the real one follows.
            input = rest;
            continue;
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        };
        let body = if head_only || status == 204 || status == 304 {
            Vec::new()
        } else if header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            dechunk(rest)?
        } else if let Some(length) = header("content-length") {
            let length: usize = length
                .parse()
                .map_err(|_| format!("bad Content-Length {length:?}"))?;
            rest.get(..length)
                .ok_or_else(|| format!("body truncated: {} of {length} bytes", rest.len()))?
                .to_vec()
        } else {
            rest.to_vec()
        };
        return Ok((status, headers, body));
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Decodes a chunked body (trailers are ignored).
fn dechunk(mut input: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(input, b"\r\n").ok_or("chunk size line not terminated")?;
        let line = std::str::from_utf8(&input[..line_end]).map_err(|_| "bad chunk size line")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        input = &input[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = input
            .get(..size)
            .ok_or_else(|| format!("chunk truncated: {} of {size} bytes", input.len()))?;
        body.extend_from_slice(chunk);
        input = input
            .get(size..)
            .and_then(|rest| rest.strip_prefix(b"\r\n"))
            .ok_or("chunk not followed by CRLF")?;
    }
}

#[cfg(test)]
mod tests {
    use horde_protocol::codec::encode_frame;

    use super::*;

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
            let (connection, _, _) = server.accept().await.unwrap().unwrap();
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

    #[test]
    fn data_header_plus_payload_is_the_codec_encoding() {
        for len in [1usize, 5, 127, 128, 300, 16_383, 16_384, DATA_CHUNK] {
            let payload = vec![0xa5u8; len];
            let mut ours = data_header(len).to_vec();
            ours.extend_from_slice(&payload);
            let codec = encode_frame(&TunnelFrame::Data(payload), MAX_TUNNEL_FRAME_LEN).unwrap();
            assert_eq!(ours, codec, "len {len}");
        }
    }

    #[test]
    fn parses_content_length_chunked_and_eof_bodies() {
        let (status, headers, body) = parse_http_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            false,
        )
        .unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
        assert_eq!(headers[1], ("X-A".to_owned(), "b".to_owned()));

        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                        5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nTrailer: x\r\n\r\n";
        let (_, _, body) = parse_http_response(chunked, false).unwrap();
        assert_eq!(body, b"hello!");

        let (status, _, body) =
            parse_http_response(b"HTTP/1.0 404 Not Found\r\n\r\nall of it", false).unwrap();
        assert_eq!((status, body.as_slice()), (404, &b"all of it"[..]));

        let interim =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_http_response(interim, false).unwrap().0, 201);
    }

    #[test]
    fn malformed_responses_are_errors_not_panics() {
        for input in [
            &b""[..],
            b"garbage",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        ] {
            assert!(parse_http_response(input, false).is_err(), "{input:?}");
        }
    }
}
