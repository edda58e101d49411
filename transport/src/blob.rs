//! The `horde/blob/1` protocol over QUIC: one bidirectional stream per request.
//!
//! The messages and the verification tree are sans-IO in [`horde_protocol::blob`]; this module
//! moves them over quinn streams:
//! - client side: [`request_get`] returns a [`GetStream`] whose [`GetStream::next`] yields only
//!   *verified* data (every chunk group checked against the root hash before it is handed out),
//!   or receives the whole blob into a [`BlobBuffer`] (`blob/buffer.rs`: memory faulted in ahead
//!   of the data for large blobs), a `Vec` or a [`VerifiedSink`];
//!   [`start_put`] returns a [`PutUpload`]; [`stat`] asks what the store holds.
//! - server side: [`read_request`], [`write_response`] and [`serve_get`], which streams a
//!   [`ServedBlob`] (bytes plus outboard, in memory or in files).
//!
//! A receiver that finds a bad chunk group stops the stream with [`STOP_INTEGRITY`] and returns
//! [`BlobError::Integrity`]; data verified before the failure is still handed out first, so a
//! resume never re-fetches more than one chunk group beyond what is missing.
//!
//! Both sides give up on a stream that makes no progress for a *progress timeout*
//! ([`PROGRESS_TIMEOUT`] by default): the receiver when no byte arrives, the server when the
//! peer takes none of what it sends. QUIC keep-alives keep a silent peer's connection open, so
//! only this tells a stalled transfer from a slow one. The operation then fails with
//! [`BlobError::Stalled`]; a receiver stops the stream with [`codes::TIMED_OUT`].

use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use horde_protocol::BlobHash;
use horde_protocol::blob::{
    BlobErrorKind, BlobRequest, BlobResponse, BlobStatus, ByteRange, CHUNK_GROUP_LEN, CV_LEN,
    MAX_REQUEST_LEN, MAX_RESPONSE_LEN, Piece, SEGMENT_LEN, cvs_from_bytes, group_count,
    normalize_ranges, parent_cv_of, plan, root_of, segment_count, subtree_cv,
};
use horde_protocol::codec::encode_frame;
use horde_protocol::wire::blob_stop;
use quinn::VarInt;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use crate::codes;
use crate::framed::{ChannelError, FrameReader};

mod buffer;

pub use buffer::{BlobBuffer, MAPPED_MIN};

/// Stream stop code: the receiver found data that does not match the hash
/// ([`blob_stop::INTEGRITY`]).
pub const STOP_INTEGRITY: VarInt = VarInt::from_u32(blob_stop::INTEGRITY);
/// Stream stop code: the receiver refuses a blob larger than its limit
/// ([`blob_stop::TOO_LARGE`]).
pub const STOP_TOO_LARGE: VarInt = VarInt::from_u32(blob_stop::TOO_LARGE);
/// Stream stop code: the receiver no longer wants the data (cancelled, local failure)
/// ([`blob_stop::CANCELLED`]).
pub const STOP_CANCELLED: VarInt = VarInt::from_u32(blob_stop::CANCELLED);

/// Pieces read from disk per blocking task (up to 4 MiB): the next batch is read while the
/// previous one is sent, so the disk and the network overlap, and a blocking thread only ever
/// waits for the disk, never for the peer.
const READ_AHEAD_PIECES: usize = 4;

/// Default progress timeout of a blob stream: 30 s without a byte received, or without the peer
/// taking any of what we send. Three idle timeouts ([`crate::MAX_IDLE_TIMEOUT`]): far longer
/// than any pause a healthy peer makes (the sender writes at most a 1 MiB piece at a time, so a
/// reader taking 35 kB/s never trips it), short enough that a peer that stops reading or
/// sending releases its stream, memory and file handles within half a minute.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

/// A blob transfer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// Data from the peer does not match the hash; nothing from `offset` on was accepted.
    #[error("integrity check failed at byte {offset}: the data does not match the blob hash")]
    Integrity {
        /// First byte of the chunk group (or segment) that failed.
        offset: u64,
    },
    /// The storage node does not hold the blob.
    #[error("blob {0} not found")]
    NotFound(BlobHash),
    /// The storage node refused the request.
    #[error("refused by the storage node ({kind:?}): {message}")]
    Refused {
        /// Why.
        kind: BlobErrorKind,
        /// The node's explanation.
        message: String,
    },
    /// The blob is larger than the limit in force.
    #[error("blob of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The peer broke the protocol (unexpected message, bad offsets).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A frame was refused or a framed read failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The stream ended before all expected bytes arrived.
    #[error("stream ended early: {missing} bytes missing")]
    Truncated {
        /// Bytes still expected.
        missing: u64,
    },
    /// Reading the stream failed (reset by the peer, connection lost).
    #[error("reading the stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing the stream failed (stopped by the peer, connection lost).
    #[error("writing the stream: {0}")]
    Write(#[from] quinn::WriteError),
    /// The connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A local I/O error (reading the blob from disk).
    #[error("local I/O: {0}")]
    Io(#[from] io::Error),
    /// The stream made no progress for the progress timeout: the peer sent nothing, or took
    /// nothing of what we sent, for that long.
    #[error("the stream made no progress for {idle:.1?}")]
    Stalled {
        /// The progress timeout that expired.
        idle: Duration,
    },
}

impl BlobError {
    /// Whether retrying on a new connection may succeed (the connection or stream was lost).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Read(_)
            | Self::Write(_)
            | Self::Connection(_)
            | Self::Truncated { .. }
            | Self::Stalled { .. } => true,
            Self::Channel(ChannelError::Read(_) | ChannelError::Write(_)) => true,
            Self::Refused { kind, .. } => *kind == BlobErrorKind::Busy,
            _ => false,
        }
    }
}

/// Runs one step of a transfer that needs the peer (a read, a write), failing with
/// [`BlobError::Stalled`] if it makes no progress within `limit`.
pub async fn within_progress_timeout<T, E: Into<BlobError>>(
    limit: Duration,
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, BlobError> {
    match tokio::time::timeout(limit, step).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(BlobError::Stalled { idle: limit }),
    }
}

/// Where served bytes live: in memory, or in a file read with positional reads.
#[derive(Debug, Clone)]
pub enum Backing {
    /// Bytes in memory.
    Memory(Bytes),
    /// An open file.
    File(Arc<std::fs::File>),
}

impl Backing {
    /// Reads `len` bytes at `offset` (blocking for files: call from a blocking context).
    pub fn read_at(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        match self {
            Self::Memory(bytes) => {
                let start = usize::try_from(offset).map_err(io::Error::other)?;
                let end = start.saturating_add(usize::try_from(len).map_err(io::Error::other)?);
                if end > bytes.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past the end of the blob",
                    ));
                }
                Ok(bytes.slice(start..end))
            }
            Self::File(file) => {
                let mut buffer = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
                file.read_exact_at(&mut buffer, offset)?;
                Ok(Bytes::from(buffer))
            }
        }
    }

    fn is_memory(&self) -> bool {
        matches!(self, Self::Memory(_))
    }
}

/// Reads the pieces of one response, in order. Data from a file is read through a private
/// open file description (its own cursor) into fresh, unzeroed buffers; if that cannot be
/// opened it falls back to positional reads. Blocking: call from a blocking context.
struct SequentialReader {
    blob: ServedBlob,
    private: Option<(std::fs::File, u64)>,
}

impl SequentialReader {
    fn new(blob: ServedBlob) -> Self {
        let private = match &blob.data {
            Backing::File(file) => {
                use std::os::fd::AsRawFd as _;
                // Reopening through procfs gives a new file description, so this cursor is
                // shared with no other reader of the same `File`.
                std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
                    .ok()
                    .filter(|reopened| {
                        use std::os::unix::fs::MetadataExt as _;
                        match (reopened.metadata(), file.metadata()) {
                            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                            _ => false,
                        }
                    })
                    .map(|reopened| (reopened, u64::MAX))
            }
            Backing::Memory(_) => None,
        };
        Self { blob, private }
    }

    fn read_piece(&mut self, piece: Piece) -> io::Result<Bytes> {
        match piece {
            Piece::Data { offset, len } => self.read_data(offset, len),
            Piece::GroupCvs { .. } => self.blob.read_piece(piece),
        }
    }

    fn read_data(&mut self, offset: u64, len: u64) -> io::Result<Bytes> {
        use std::io::{Read as _, Seek as _};
        let Some((file, position)) = self.private.as_mut() else {
            return self.blob.data.read_at(offset, len);
        };
        if *position != offset {
            file.seek(io::SeekFrom::Start(offset))?;
            *position = offset;
        }
        let mut buffer = Vec::with_capacity(usize::try_from(len).map_err(io::Error::other)?);
        let read = file.take(len).read_to_end(&mut buffer)?;
        *position += read as u64;
        if (read as u64) < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the blob",
            ));
        }
        Ok(Bytes::from(buffer))
    }
}

/// A blob ready to be served: its bytes and its outboard ([`horde_protocol::blob::Outboard`]
/// layout: group CVs then segment CVs).
#[derive(Debug, Clone)]
pub struct ServedBlob {
    /// The blob's size.
    pub size: u64,
    /// The blob's bytes.
    pub data: Backing,
    /// Its serialized outboard.
    pub outboard: Backing,
}

impl ServedBlob {
    /// A blob held in memory; computes its outboard. Returns the blob and its hash.
    pub fn from_memory(bytes: Bytes) -> (Self, BlobHash) {
        let outboard = horde_protocol::blob::Outboard::of(&bytes);
        let single = (outboard.group_cvs.len() == 1).then_some(&bytes[..]);
        let hash = outboard
            .root(single)
            .unwrap_or_else(|| BlobHash::of(&bytes));
        (
            Self {
                size: bytes.len() as u64,
                outboard: Backing::Memory(Bytes::from(outboard.to_bytes())),
                data: Backing::Memory(bytes),
            },
            hash,
        )
    }

    fn segment_cvs(&self) -> io::Result<Vec<[u8; 32]>> {
        let segments = segment_count(self.size);
        if segments <= 1 {
            return Ok(Vec::new());
        }
        let offset = group_count(self.size) * CV_LEN as u64;
        let bytes = self.outboard.read_at(offset, segments * CV_LEN as u64)?;
        cvs_from_bytes(&bytes)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "outboard length"))
    }

    fn read_piece(&self, piece: Piece) -> io::Result<Bytes> {
        match piece {
            Piece::GroupCvs {
                first_group, count, ..
            } => self
                .outboard
                .read_at(first_group * CV_LEN as u64, count * CV_LEN as u64),
            Piece::Data { offset, len } => self.data.read_at(offset, len),
        }
    }
}

/// Writes one response frame.
pub async fn write_response(
    send: &mut quinn::SendStream,
    response: &BlobResponse,
) -> Result<(), BlobError> {
    let frame = encode_frame(response, MAX_RESPONSE_LEN).map_err(ChannelError::from)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Writes one request frame.
async fn write_request(
    send: &mut quinn::SendStream,
    request: &BlobRequest,
) -> Result<(), BlobError> {
    let frame = encode_frame(request, MAX_REQUEST_LEN).map_err(ChannelError::from)?;
    send.write_all(&frame).await?;
    Ok(())
}

async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: u32,
) -> Result<Option<T>, BlobError> {
    Ok(FrameReader::new(max).read(recv).await?)
}

/// Reads the request frame that opens a blob stream (capped at [`MAX_REQUEST_LEN`], checked
/// before allocating). `Ok(None)` if the stream ended without one.
pub async fn read_request(recv: &mut quinn::RecvStream) -> Result<Option<BlobRequest>, BlobError> {
    read_frame(recv, MAX_REQUEST_LEN).await
}

async fn read_response(recv: &mut quinn::RecvStream) -> Result<BlobResponse, BlobError> {
    read_frame(recv, MAX_RESPONSE_LEN)
        .await?
        .ok_or(BlobError::Truncated { missing: 1 })
}

fn refused(kind: BlobErrorKind, message: String) -> BlobError {
    BlobError::Refused { kind, message }
}

fn unexpected(response: &BlobResponse) -> BlobError {
    BlobError::Protocol(format!("unexpected response {response:?}"))
}

/// Server side of `Get`: answers with the header and streams the planned pieces of `ranges`,
/// then finishes the stream. Returns the bytes written after the header.
///
/// Every write must make progress within `progress_timeout`, else [`BlobError::Stalled`] is
/// returned and the caller resets the stream. Disk reads run on blocking threads a batch at a
/// time and never wait for the peer: a peer that stops reading holds no blocking thread.
pub async fn serve_get(
    send: &mut quinn::SendStream,
    blob: &ServedBlob,
    ranges: &[ByteRange],
    progress_timeout: Duration,
) -> Result<u64, BlobError> {
    let normalized = match normalize_ranges(ranges, blob.size) {
        Ok(normalized) => normalized,
        Err(error) => {
            let message = error.to_string();
            let response = BlobResponse::Error {
                kind: BlobErrorKind::BadRequest,
                message: message.clone(),
            };
            within_progress_timeout(progress_timeout, write_response(send, &response)).await?;
            let _ = send.finish();
            return Err(BlobError::Protocol(message));
        }
    };
    let header_blob = blob.clone();
    let segment_cvs = if blob.outboard.is_memory() {
        blob.segment_cvs()?
    } else {
        tokio::task::spawn_blocking(move || header_blob.segment_cvs())
            .await
            .map_err(io::Error::other)??
    };
    let header = BlobResponse::Header {
        size: blob.size,
        segment_cvs,
    };
    within_progress_timeout(progress_timeout, write_response(send, &header)).await?;
    let pieces = plan(blob.size, &normalized);
    let mut sent = 0u64;
    if blob.data.is_memory() && blob.outboard.is_memory() {
        for piece in pieces {
            let bytes = blob.read_piece(piece)?;
            sent += bytes.len() as u64;
            within_progress_timeout(progress_timeout, send.write_chunk(bytes)).await?;
        }
    } else {
        let mut pieces = pieces.into_iter();
        let mut reading = Some(read_batch(blob, None, &mut pieces));
        while let Some(batch) = reading.take() {
            let (reader, batch) = batch.await.map_err(io::Error::other)?;
            // The next batch is read while this one is sent; if the peer stalls, the task is
            // dropped with it and its thread ends after that one bounded read.
            if !pieces.as_slice().is_empty() {
                reading = Some(read_batch(blob, Some(reader), &mut pieces));
            }
            for bytes in batch? {
                sent += bytes.len() as u64;
                within_progress_timeout(progress_timeout, send.write_chunk(bytes)).await?;
            }
        }
    }
    let _ = send.finish();
    Ok(sent)
}

/// Reads the next [`READ_AHEAD_PIECES`] of `pieces` on a blocking thread, with `reader` (or a
/// new one for `blob`); returns the reader for the next batch with the bytes.
fn read_batch(
    blob: &ServedBlob,
    reader: Option<SequentialReader>,
    pieces: &mut std::vec::IntoIter<Piece>,
) -> tokio::task::JoinHandle<(SequentialReader, io::Result<Vec<Bytes>>)> {
    let batch: Vec<Piece> = pieces.by_ref().take(READ_AHEAD_PIECES).collect();
    let blob = blob.clone();
    tokio::task::spawn_blocking(move || {
        let mut reader = reader.unwrap_or_else(|| SequentialReader::new(blob));
        let bytes = batch
            .into_iter()
            .map(|piece| reader.read_piece(piece))
            .collect();
        (reader, bytes)
    })
}

/// Verified bytes of a blob: `bytes` is the blob's content at `offset..offset + bytes.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedData {
    /// Where these bytes sit in the blob.
    pub offset: u64,
    /// The bytes, already checked against the blob hash.
    pub bytes: Bytes,
}

/// Chunks taken from quinn per `read_chunks` call (one lock of the connection for all of them).
const READ_BATCH: usize = 64;

/// Verified bytes handed out per [`GetStream::next`], at most (whole chunk groups).
const OUTPUT_LEN: usize = 1 << 20;

/// Verified runs queued for [`GetStream::next`].
const OUTPUT_QUEUE: usize = 4;

/// The client side of a `Get` after the header: yields verified data in blob order.
///
/// One task reads STREAM frames from quinn in batches (`read_chunks`, no copy), copies each
/// frame once, straight into the destination (the caller's buffer, a write buffer, or the runs
/// [`Self::next`] returns), checks each chunk group there against its CV (itself checked against
/// the root) while it is still in cache, and only then hands the bytes on. The task runs on the
/// runtime's workers beside quinn's drivers: no thread hand-off per batch of frames, and the
/// stream is only read as fast as the data is verified, so quinn's flow control paces the sender.
#[derive(Debug)]
pub struct GetStream {
    hash: BlobHash,
    size: u64,
    ranges: Vec<Range<u64>>,
    /// The stream and the verification state, until the transfer starts.
    setup: Option<(quinn::RecvStream, Tree)>,
    output: Option<mpsc::Receiver<Output>>,
    receiver: Option<ReceiverGuard>,
    wire_bytes: Arc<AtomicU64>,
    failed: bool,
    /// How long the receiver waits for the next bytes before giving up.
    progress_timeout: Duration,
}

/// Aborts the receiving task when the stream is dropped (its `RecvStream` is then dropped, which
/// stops the stream).
#[derive(Debug)]
struct ReceiverGuard(tokio::task::AbortHandle);

impl Drop for ReceiverGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the receiving task hands [`GetStream::next`].
enum Output {
    Data(VerifiedData),
    Done,
    Failed(BlobError),
}

/// Client side of `Get`: opens a stream on `connection`, asks for `ranges` of `hash` (empty:
/// everything) and checks the header: the size against `max_size`, the segment CVs against the
/// hash. Opening the stream, sending the request, the header and then every read of the body
/// must each make progress within `progress_timeout`, else the transfer fails with
/// [`BlobError::Stalled`] (and the stream is stopped with [`codes::TIMED_OUT`]).
pub async fn request_get(
    connection: &quinn::Connection,
    hash: BlobHash,
    ranges: Vec<ByteRange>,
    max_size: u64,
    progress_timeout: Duration,
) -> Result<GetStream, BlobError> {
    let (mut send, mut recv) =
        within_progress_timeout(progress_timeout, connection.open_bi()).await?;
    let request = BlobRequest::Get {
        hash,
        ranges: ranges.clone(),
    };
    within_progress_timeout(progress_timeout, write_request(&mut send, &request)).await?;
    let _ = send.finish();
    let header = within_progress_timeout(progress_timeout, read_response(&mut recv)).await;
    if let Err(BlobError::Stalled { .. }) = header {
        let _ = recv.stop(codes::TIMED_OUT);
    }
    let (size, segment_cvs) = match header? {
        BlobResponse::Header { size, segment_cvs } => (size, segment_cvs),
        BlobResponse::NotFound => return Err(BlobError::NotFound(hash)),
        BlobResponse::Error { kind, message } => return Err(refused(kind, message)),
        other => return Err(unexpected(&other)),
    };
    if size > max_size {
        let _ = recv.stop(STOP_TOO_LARGE);
        return Err(BlobError::TooLarge {
            size,
            max: max_size,
        });
    }
    let segments = segment_count(size);
    let header_ok = match segments {
        0 => hash == BlobHash::of(&[]),
        1 => segment_cvs.is_empty(),
        _ => segment_cvs.len() as u64 == segments && root_of(&segment_cvs) == Some(hash),
    };
    if !header_ok {
        let _ = recv.stop(STOP_INTEGRITY);
        return Err(BlobError::Integrity { offset: 0 });
    }
    let normalized = normalize_ranges(&ranges, size)
        .map_err(|error| BlobError::Protocol(format!("ranges: {error}")))?;
    let pieces = plan(size, &normalized);
    let tree = Tree {
        hash,
        size,
        segment_cvs,
        pieces: pieces.into_iter(),
        current: None,
        piece_received: 0,
        cv_buffer: Vec::new(),
        group_cvs: Vec::new(),
        first_group: 0,
    };
    Ok(GetStream {
        hash,
        size,
        ranges: normalized,
        setup: Some((recv, tree)),
        output: None,
        receiver: None,
        wire_bytes: Arc::new(AtomicU64::new(0)),
        failed: false,
        progress_timeout,
    })
}

impl GetStream {
    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The blob's hash.
    pub fn hash(&self) -> BlobHash {
        self.hash
    }

    /// The byte ranges this response carries (widened to chunk groups, clamped to the size).
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Bytes read from the stream so far after the header (CVs and data, verified or not).
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes.load(Ordering::Relaxed)
    }

    /// Spawns the task that receives and verifies the response into `sink`; it is aborted when
    /// this stream is dropped. The task returns the verifier (with its sink) and the outcome.
    fn start_receiver<K: Sink + 'static>(
        &mut self,
        recv: quinn::RecvStream,
        tree: Tree,
        sink: K,
        start: u64,
    ) -> tokio::task::JoinHandle<(Verifier<K>, Result<(), BlobError>)> {
        let wire_bytes = Arc::clone(&self.wire_bytes);
        let progress_timeout = self.progress_timeout;
        let task = tokio::spawn(async move {
            let mut verifier = Verifier::new(tree, sink, start, progress_timeout);
            let result = verifier.receive(recv, &wire_bytes).await;
            (verifier, result)
        });
        self.receiver = Some(ReceiverGuard(task.abort_handle()));
        task
    }

    /// The next run of verified bytes, `Ok(None)` when every requested range was delivered.
    ///
    /// On a bad chunk group the stream is stopped with [`STOP_INTEGRITY`] and
    /// [`BlobError::Integrity`] is returned. Groups verified before a failure are returned first
    /// and the error on a later call.
    pub async fn next(&mut self) -> Result<Option<VerifiedData>, BlobError> {
        if self.failed {
            return Err(BlobError::Protocol(
                "the transfer already failed".to_owned(),
            ));
        }
        if let Some((recv, tree)) = self.setup.take() {
            let (output, verified) = mpsc::channel(OUTPUT_QUEUE);
            let start = self.ranges.first().map_or(0, |range| range.start);
            let task = self.start_receiver(recv, tree, ChannelSink::new(output), start);
            // Reports the outcome after the data (the task's sender is gone by then if the
            // consumer went away, and then nobody is listening). Detached: it owns nothing but
            // the receiver's handle and ends with the receiver, which this stream aborts on drop.
            tokio::spawn(async move {
                if let Ok((verifier, result)) = task.await {
                    let _ = verifier
                        .sink
                        .output
                        .send(match result {
                            Ok(()) => Output::Done,
                            Err(error) => Output::Failed(error),
                        })
                        .await;
                }
            });
            self.output = Some(verified);
        }
        let Some(output) = self.output.as_mut() else {
            return Ok(None);
        };
        match output.recv().await {
            Some(Output::Data(data)) => Ok(Some(data)),
            Some(Output::Done) => {
                self.output = None;
                Ok(None)
            }
            Some(Output::Failed(error)) => {
                self.failed = true;
                Err(error)
            }
            None => {
                self.failed = true;
                Err(BlobError::Io(io::Error::other("blob receiver task failed")))
            }
        }
    }

    /// Receives the whole response into `buffer`, which must hold exactly the blob's bytes
    /// before the first requested range (the response must be one range to the end of the
    /// blob, or nothing). Bytes are copied once, straight from the network frames into the
    /// buffer (grown to the blob's size; a buffer with room is written in place), and each chunk
    /// group is verified there: on return `buffer` holds only verified bytes (on an error, the
    /// verified prefix; a resume continues from its length). Returns the bytes read from the
    /// stream after the header.
    ///
    /// For a large blob, [`Self::read_to_buffer`] costs less: its fresh memory is faulted in a
    /// MiB per system call rather than a page per fault.
    pub async fn read_to_vec(self, buffer: &mut Vec<u8>) -> Result<u64, BlobError> {
        let held = buffer.len();
        let size = self.whole_size(held as u64)?;
        // A caller's buffer with room (a reused one) is written in place: its pages are mapped
        // already. Otherwise a fresh one, zeroed lazily by the OS (`vec!` of zeros asks for
        // zeroed memory and writes nothing): each page is faulted in by the first copy into it,
        // on the receiving task, so it is still in cache when it is filled.
        let dest = if buffer.capacity() >= size {
            let mut dest = std::mem::take(buffer);
            dest.resize(size, 0);
            dest
        } else {
            let mut dest = vec![0u8; size];
            dest[..held].copy_from_slice(buffer);
            *buffer = Vec::new();
            dest
        };
        let (mut dest, accepted, result) = self.read_whole(dest, held, size).await?;
        dest.truncate(accepted);
        *buffer = dest;
        result
    }

    /// Receives the whole response into `buffer`, like [`Self::read_to_vec`]: `buffer` must
    /// hold exactly the blob's bytes before the first requested range, and on return holds only
    /// verified bytes (on an error, the verified prefix, for a resume). A buffer without room for
    /// the blob is replaced by a larger one (its prefix copied over): from [`MAPPED_MIN`] on, a
    /// mapping whose pages are faulted in a MiB at a time just ahead of the data, one system
    /// call each instead of a page fault per 4 KiB (≈ 20% less CPU for the fresh memory). A buffer with room (a
    /// [`BlobBuffer::clear`]ed one) is filled in place. Returns the bytes read from the stream
    /// after the header.
    pub async fn read_to_buffer(self, buffer: &mut BlobBuffer) -> Result<u64, BlobError> {
        let held = buffer.len();
        let size = self.whole_size(held as u64)?;
        buffer.reserve_total(size);
        let dest = std::mem::take(buffer);
        let (mut dest, accepted, result) = self.read_whole(dest, held, size).await?;
        dest.set_verified_len(accepted);
        *buffer = dest;
        result
    }

    /// The blob's size as a `usize`, if this response carries exactly the bytes after the
    /// `held` first ones (one range to the end, or nothing when all are held).
    fn whole_size(&self, held: u64) -> Result<usize, BlobError> {
        if self.setup.is_none() {
            return Err(BlobError::Protocol(
                "the transfer already started".to_owned(),
            ));
        }
        let contiguous = match self.ranges.as_slice() {
            [] => held == self.size,
            [range] => range.start == held && range.end == self.size,
            _ => false,
        };
        if !contiguous {
            return Err(BlobError::Protocol(format!(
                "reading into a buffer of {held} bytes needs one range from there to the end"
            )));
        }
        Ok(usize::try_from(self.size).map_err(io::Error::other)?)
    }

    /// Receives the response into `dest[held..size]` (`dest[..held]` holds the blob's first
    /// bytes). Returns the destination, how much of it is verified, and the outcome; `Err` only
    /// if the receiving task itself failed.
    async fn read_whole<D: Destination + 'static>(
        mut self,
        dest: D,
        held: usize,
        size: usize,
    ) -> Result<(D, usize, Result<u64, BlobError>), BlobError> {
        let Some((recv, tree)) = self.setup.take() else {
            return Err(BlobError::Protocol(
                "the transfer already started".to_owned(),
            ));
        };
        let sink = WholeSink {
            dest,
            accepted: held,
            end: size,
        };
        let task = self.start_receiver(recv, tree, sink, held as u64);
        let (verifier, result) = task.await.map_err(io::Error::other)?;
        let WholeSink { dest, accepted, .. } = verifier.sink;
        Ok((dest, accepted, result.map(|()| self.wire_bytes())))
    }

    /// Receives the whole response into `writer`, called on a writer thread with verified bytes
    /// only, in blob order, from buffers reused across writes. `progress` gets the blob position
    /// reached after each write. Returns the writer (unless the writer thread panicked) and the
    /// outcome: the bytes read from the stream after the header, or why the transfer stopped
    /// (everything verified before a failure was written first).
    pub async fn read_to_sink<W: VerifiedSink + 'static>(
        mut self,
        writer: W,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> (Option<W>, Result<u64, BlobError>) {
        let Some((recv, tree)) = self.setup.take() else {
            let error = BlobError::Protocol("the transfer already started".to_owned());
            return (Some(writer), Err(error));
        };
        let start = self.ranges.first().map_or(self.size, |range| range.start);
        let (position, mut positions) = watch::channel(start);
        let (windows, mut to_write) = mpsc::channel::<WrittenWindow>(WRITE_QUEUE);
        let (spare, spares) = std::sync::mpsc::sync_channel(WRITE_QUEUE + 2);
        let mut writer_thread = tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            while let Some(window) = to_write.blocking_recv() {
                let bytes = window.buffer.get(window.bytes.clone()).unwrap_or_default();
                if let Err(error) = writer.write(window.offset, bytes) {
                    return (writer, Some(error));
                }
                position.send_replace(window.offset + bytes.len() as u64);
                let _ = spare.try_send(window.buffer);
            }
            (writer, None)
        });
        let sink = WriterSink {
            window: Vec::new(),
            window_start: 0,
            windows,
            spares,
            pending: Vec::new(),
        };
        let mut task = self.start_receiver(recv, tree, sink, start);
        let joined = loop {
            tokio::select! {
                joined = &mut task => break joined,
                Ok(()) = positions.changed() => progress(*positions.borrow_and_update()),
            }
        };
        // The sink (and with it the writer's queue) is dropped here: the writer finishes the
        // windows still queued and stops.
        let result = match joined {
            Ok((verifier, result)) => {
                drop(verifier);
                result
            }
            Err(error) => Err(BlobError::Io(io::Error::other(error))),
        };
        let written = loop {
            tokio::select! {
                written = &mut writer_thread => break written,
                Ok(()) = positions.changed() => progress(*positions.borrow_and_update()),
            }
        };
        let Ok((writer, error)) = written else {
            let error = io::Error::other("the blob writer thread panicked");
            return (None, Err(BlobError::Io(error)));
        };
        progress(*positions.borrow());
        let result = match (result, error) {
            (Err(_), Some(error)) => Err(BlobError::Io(error)),
            (result, _) => result,
        };
        (Some(writer), result.map(|()| self.wire_bytes()))
    }
}

/// Where verified bytes go. The verifier copies received bytes straight into the sink's current
/// *window* (destination memory), verifies each chunk group in place while it is still in cache,
/// and hands the window on once it is full of verified groups: one copy from the network frames
/// to the destination, no staging buffer. [`Self::window`] and [`Self::accept`] never block;
/// what the consumer must wait for happens in [`Self::flush`], between batches of frames.
trait Sink: Send {
    /// Room for the next bytes of the blob, contiguous with what was last accepted (empty when
    /// the consumer is gone or has no more room). Its length is a multiple of
    /// [`CHUNK_GROUP_LEN`], except at the end of a destination that ends with the blob, so chunk
    /// groups never straddle two windows.
    fn window(&mut self) -> &mut [u8];
    /// Takes the first `len` bytes of the window (verified, at blob `offset`); the next
    /// [`Self::window`] is room for the bytes after them. `false` when the consumer is gone.
    fn accept(&mut self, offset: u64, len: usize) -> bool;
    /// The first `end` bytes of the window are about to be written (a destination may fault its
    /// memory in ahead of them). Never blocks for long.
    fn prepare(&mut self, _end: usize) {}
    /// Passes what was accepted on to the consumer, waiting while it is behind. `false` when the
    /// consumer is gone.
    fn flush(&mut self) -> impl Future<Output = bool> + Send;
}

/// Hands verified runs to [`GetStream::next`] without copying them again: each window is a
/// [`BytesMut`] whose verified front is frozen and queued.
struct ChannelSink {
    output: mpsc::Sender<Output>,
    window: BytesMut,
    /// Runs accepted but not yet sent (at most a few: one batch of frames fills few windows).
    pending: Vec<VerifiedData>,
}

impl ChannelSink {
    fn new(output: mpsc::Sender<Output>) -> Self {
        Self {
            output,
            window: BytesMut::new(),
            pending: Vec::new(),
        }
    }
}

impl Sink for ChannelSink {
    fn window(&mut self) -> &mut [u8] {
        if self.window.is_empty() {
            // Reclaims the previous allocation when its runs were already dropped.
            self.window.reserve(OUTPUT_LEN);
            self.window.resize(OUTPUT_LEN, 0);
        }
        &mut self.window
    }

    fn accept(&mut self, offset: u64, len: usize) -> bool {
        let bytes = self.window.split_to(len).freeze();
        self.pending.push(VerifiedData { offset, bytes });
        !self.output.is_closed()
    }

    async fn flush(&mut self) -> bool {
        for data in self.pending.drain(..) {
            if self.output.send(Output::Data(data)).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// A blocking consumer of verified bytes for [`GetStream::read_to_sink`], called on a writer
/// thread in blob order.
pub trait VerifiedSink: Send {
    /// Takes verified bytes that sit at `offset` in the blob. Whole windows start at an address
    /// aligned to [`SINK_ALIGN`] and are [`SINK_BATCH`] long (a writer may use direct I/O for
    /// them); the last one of a range may be shorter.
    fn write(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
}

/// Verified bytes gathered before one [`VerifiedSink::write`]: a multiple of the chunk group,
/// small enough that the window is still in cache when it is written out.
pub const SINK_BATCH: usize = 256 << 10;

/// Alignment of the windows [`VerifiedSink::write`] gets: the page size, enough for direct I/O
/// on 512 B and 4 KiB sector devices.
pub const SINK_ALIGN: usize = 4096;

/// A window of verified bytes on its way to the writer thread.
struct WrittenWindow {
    /// Blob offset of the first byte.
    offset: u64,
    buffer: Vec<u8>,
    /// Where the bytes sit in `buffer`.
    bytes: Range<usize>,
}

/// Windows of [`SINK_BATCH`] queued for the writer thread: enough to ride out a slow write
/// without stalling the network, few enough to bound the memory (2 MiB).
const WRITE_QUEUE: usize = 8;

/// Feeds the writer thread of [`GetStream::read_to_sink`] with full windows and takes their
/// buffers back once written.
struct WriterSink {
    /// The buffer of the current window (empty when there is none).
    window: Vec<u8>,
    /// Where the window starts in it: the first address aligned to [`SINK_ALIGN`].
    window_start: usize,
    windows: mpsc::Sender<WrittenWindow>,
    /// Buffers the writer is done with.
    spares: std::sync::mpsc::Receiver<Vec<u8>>,
    /// Windows accepted but not yet queued for the writer.
    pending: Vec<WrittenWindow>,
}

impl Sink for WriterSink {
    fn window(&mut self) -> &mut [u8] {
        if self.window.is_empty() {
            // A buffer back from the writer, or a new one (allocated on first use: a transfer
            // that fails at once costs nothing; at most the queue's worth in flight).
            self.window = self.spares.try_recv().unwrap_or_default();
            self.window.resize(SINK_BATCH + SINK_ALIGN, 0);
            self.window_start = self
                .window
                .as_ptr()
                .align_offset(SINK_ALIGN)
                .min(SINK_ALIGN);
        }
        let start = self.window_start;
        &mut self.window[start..start + SINK_BATCH]
    }

    fn accept(&mut self, offset: u64, len: usize) -> bool {
        let buffer = std::mem::take(&mut self.window);
        let start = self.window_start;
        self.pending.push(WrittenWindow {
            offset,
            buffer,
            bytes: start..start + len,
        });
        !self.windows.is_closed()
    }

    async fn flush(&mut self) -> bool {
        for window in self.pending.drain(..) {
            if self.windows.send(window).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// Memory a whole blob is received into: [`Destination::memory`] is at least the blob's size.
trait Destination: Send {
    fn memory(&mut self) -> &mut [u8];
    /// `memory()[..end]` is about to be written.
    fn prepare(&mut self, _end: usize) {}
}

impl Destination for Vec<u8> {
    fn memory(&mut self) -> &mut [u8] {
        self
    }
}

impl Destination for BlobBuffer {
    fn memory(&mut self) -> &mut [u8] {
        self.memory_mut()
    }

    fn prepare(&mut self, end: usize) {
        BlobBuffer::prepare(self, end);
    }
}

/// The whole destination of [`GetStream::read_to_vec`] and [`GetStream::read_to_buffer`]: one
/// window from the accepted prefix to the end of the blob.
struct WholeSink<D> {
    dest: D,
    /// `dest[..accepted]` holds verified bytes (or the caller's verified prefix).
    accepted: usize,
    /// The blob's size: the window ends there.
    end: usize,
}

impl<D: Destination> Sink for WholeSink<D> {
    fn window(&mut self) -> &mut [u8] {
        self.dest
            .memory()
            .get_mut(self.accepted..self.end)
            .unwrap_or_default()
    }

    fn accept(&mut self, _offset: u64, len: usize) -> bool {
        let end = self.accepted + len;
        if end > self.end {
            return false;
        }
        self.accepted = end;
        true
    }

    fn prepare(&mut self, end: usize) {
        self.dest.prepare(self.accepted + end);
    }

    async fn flush(&mut self) -> bool {
        true
    }
}

/// The verification tree of one response: the planned pieces and the CVs checked so far.
#[derive(Debug)]
struct Tree {
    hash: BlobHash,
    size: u64,
    segment_cvs: Vec<[u8; 32]>,
    pieces: std::vec::IntoIter<Piece>,
    /// The piece being received and how much of it arrived.
    current: Option<Piece>,
    piece_received: u64,
    cv_buffer: Vec<u8>,
    group_cvs: Vec<[u8; 32]>,
    first_group: u64,
}

impl Tree {
    fn group_is_valid(&self, offset: u64, group: &[u8]) -> bool {
        if self.size <= CHUNK_GROUP_LEN {
            return BlobHash::of(group) == self.hash;
        }
        let index = (offset / CHUNK_GROUP_LEN).checked_sub(self.first_group);
        index
            .and_then(|index| self.group_cvs.get(index as usize))
            .is_some_and(|expected| subtree_cv(offset, group) == *expected)
    }

    /// Checks a complete CV block of `segment` against the header (or the root).
    fn accept_cvs(&mut self, segment: u64, first_group: u64) -> Result<(), BlobError> {
        let cvs = cvs_from_bytes(&self.cv_buffer)
            .ok_or_else(|| BlobError::Protocol("bad CV block".to_owned()))?;
        self.cv_buffer.clear();
        let valid = if self.segment_cvs.is_empty() {
            root_of(&cvs) == Some(self.hash)
        } else {
            self.segment_cvs
                .get(segment as usize)
                .is_some_and(|expected| parent_cv_of(&cvs).as_ref() == Some(expected))
        };
        if !valid {
            return Err(BlobError::Integrity {
                offset: segment * SEGMENT_LEN,
            });
        }
        self.group_cvs = cvs;
        self.first_group = first_group;
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.current.is_none() && self.pieces.as_slice().is_empty()
    }

    /// Bytes still expected on the wire.
    fn missing(&self) -> u64 {
        let current = self
            .current
            .map_or(0, |piece| piece.wire_len() - self.piece_received);
        current
            + self
                .pieces
                .as_slice()
                .iter()
                .map(Piece::wire_len)
                .sum::<u64>()
    }
}

fn consumer_gone() -> BlobError {
    BlobError::Io(io::Error::other("the consumer of the blob went away"))
}

/// Copies received frames into its [`Sink`]'s window, verifies each chunk group there, and only
/// then hands the window on.
struct Verifier<K> {
    tree: Tree,
    /// Blob offset of the window's first byte.
    window_base: u64,
    /// Bytes copied into the window.
    filled: usize,
    /// `window[..verified]` is verified.
    verified: usize,
    sink: K,
    /// How long to wait for the next bytes from the peer.
    progress_timeout: Duration,
}

impl<K: Sink> Verifier<K> {
    /// A verifier for data starting at blob offset `start`.
    fn new(tree: Tree, sink: K, start: u64, progress_timeout: Duration) -> Self {
        Self {
            tree,
            window_base: start,
            filled: 0,
            verified: 0,
            sink,
            progress_timeout,
        }
    }

    /// Feeds received bytes. Bytes beyond the plan are ignored.
    fn push(&mut self, mut bytes: &[u8]) -> Result<(), BlobError> {
        while !bytes.is_empty() {
            let piece = match self.tree.current {
                Some(piece) => piece,
                None => match self.tree.pieces.next() {
                    Some(piece) => {
                        self.start_piece(piece)?;
                        piece
                    }
                    None => return Ok(()),
                },
            };
            let wanted = (piece.wire_len() - self.tree.piece_received) as usize;
            let taken = match piece {
                Piece::GroupCvs {
                    segment,
                    first_group,
                    ..
                } => {
                    let take = wanted.min(bytes.len());
                    self.tree.cv_buffer.extend_from_slice(&bytes[..take]);
                    if take == wanted {
                        self.tree.accept_cvs(segment, first_group)?;
                    }
                    take
                }
                Piece::Data { offset, len } => {
                    let room = self.sink.window().len().saturating_sub(self.filled);
                    let take = wanted.min(bytes.len()).min(room);
                    if take == 0 {
                        return Err(BlobError::Protocol(
                            "the destination has no room for the planned data".into(),
                        ));
                    }
                    self.sink.prepare(self.filled + take);
                    let window = self.sink.window();
                    window[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
                    self.filled += take;
                    self.verify_groups(offset + len)?;
                    // A full window of verified groups goes on at once.
                    if take == room && self.verified == self.filled && !self.emit() {
                        return Err(consumer_gone());
                    }
                    take
                }
            };
            bytes = &bytes[taken..];
            self.tree.piece_received += taken as u64;
            if taken == wanted {
                self.tree.current = None;
            }
        }
        Ok(())
    }

    fn start_piece(&mut self, piece: Piece) -> Result<(), BlobError> {
        self.tree.current = Some(piece);
        self.tree.piece_received = 0;
        if let Piece::Data { offset, .. } = piece {
            let end = self.window_base + self.filled as u64;
            if offset != end {
                // A new range: hand on what the previous one left, continue at `offset`.
                if self.verified != self.filled {
                    return Err(BlobError::Protocol(
                        "unverified bytes between ranges".into(),
                    ));
                }
                if !self.emit() {
                    return Err(consumer_gone());
                }
                self.window_base = offset;
            }
        }
        Ok(())
    }

    /// Verifies the complete groups of the window up to `piece_end`, in place.
    fn verify_groups(&mut self, piece_end: u64) -> Result<(), BlobError> {
        let window = self.sink.window();
        loop {
            let offset = self.window_base + self.verified as u64;
            let group_len = CHUNK_GROUP_LEN.min(piece_end.saturating_sub(offset)) as usize;
            if group_len == 0 || self.filled - self.verified < group_len {
                return Ok(());
            }
            let group = &window[self.verified..self.verified + group_len];
            if !self.tree.group_is_valid(offset, group) {
                return Err(BlobError::Integrity { offset });
            }
            self.verified += group_len;
        }
    }

    /// Hands the verified front of the window on and starts the next window after it; bytes
    /// copied but not verified are dropped (only called when there are none, or on a failure).
    fn emit(&mut self) -> bool {
        let len = self.verified;
        self.filled = 0;
        self.verified = 0;
        if len == 0 {
            return true;
        }
        let delivered = self.sink.accept(self.window_base, len);
        self.window_base += len as u64;
        delivered
    }

    /// Reads and verifies the response body until the plan is complete or the transfer fails.
    /// On a failure, the bytes verified before it are handed on, nothing after them, then the
    /// error is returned (and the stream stopped with [`STOP_INTEGRITY`] for an integrity
    /// failure, [`codes::TIMED_OUT`] when the peer sent nothing for the progress timeout,
    /// [`STOP_CANCELLED`] otherwise).
    async fn receive(
        &mut self,
        mut recv: quinn::RecvStream,
        wire_bytes: &AtomicU64,
    ) -> Result<(), BlobError> {
        let result = self.receive_body(&mut recv, wire_bytes).await;
        match &result {
            Err(BlobError::Integrity { .. }) => {
                let _ = recv.stop(STOP_INTEGRITY);
            }
            Err(BlobError::Stalled { .. }) => {
                let _ = recv.stop(codes::TIMED_OUT);
            }
            Err(_) => {
                let _ = recv.stop(STOP_CANCELLED);
            }
            Ok(()) => {}
        }
        let delivered = self.emit() && self.sink.flush().await;
        match result {
            Ok(()) if !delivered => Err(consumer_gone()),
            result => result,
        }
    }

    async fn receive_body(
        &mut self,
        recv: &mut quinn::RecvStream,
        wire_bytes: &AtomicU64,
    ) -> Result<(), BlobError> {
        let mut chunks = vec![Bytes::new(); READ_BATCH];
        while !self.tree.is_complete() {
            let read = recv.read_chunks(&mut chunks);
            let Some(count) = within_progress_timeout(self.progress_timeout, read).await? else {
                return Err(BlobError::Truncated {
                    missing: self.tree.missing(),
                });
            };
            for chunk in &mut chunks[..count] {
                let chunk = std::mem::take(chunk);
                wire_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                self.push(&chunk)?;
            }
            if !self.sink.flush().await {
                return Err(consumer_gone());
            }
        }
        Ok(())
    }
}

/// Client side of `Stat`.
pub async fn stat(connection: &quinn::Connection, hash: BlobHash) -> Result<BlobStatus, BlobError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    write_request(&mut send, &BlobRequest::Stat { hash }).await?;
    let _ = send.finish();
    match read_response(&mut recv).await? {
        BlobResponse::Status(status) => Ok(status),
        BlobResponse::Error { kind, message } => Err(refused(kind, message)),
        other => Err(unexpected(&other)),
    }
}

/// The client side of a `Put` once the store accepted it: write bytes from [`Self::offset`] to
/// the end, then [`Self::finish`].
#[derive(Debug)]
pub struct PutUpload {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    size: u64,
    offset: u64,
    position: u64,
}

/// Client side of `Put`: announces `size` (and `hash`, to let the store resume a partial upload
/// when `resume` is set) and waits for the store's go-ahead.
pub async fn start_put(
    connection: &quinn::Connection,
    size: u64,
    hash: Option<BlobHash>,
    resume: bool,
) -> Result<PutUpload, BlobError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    write_request(&mut send, &BlobRequest::Put { size, hash, resume }).await?;
    match read_response(&mut recv).await? {
        BlobResponse::PutReady { offset } if offset <= size => Ok(PutUpload {
            send,
            recv,
            size,
            offset,
            position: offset,
        }),
        BlobResponse::Error { kind, message } => Err(refused(kind, message)),
        other => Err(unexpected(&other)),
    }
}

impl PutUpload {
    /// Where the upload starts (non-zero when the store resumes a partial upload).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes of the blob sent or already held by the store.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Sends the next bytes of the blob.
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), BlobError> {
        let end = self.position + bytes.len() as u64;
        if end > self.size {
            return Err(BlobError::Protocol(format!(
                "writing past the announced size {}",
                self.size
            )));
        }
        match self.send.write_chunk(bytes).await {
            Ok(()) => {
                self.position = end;
                Ok(())
            }
            // The store stopped us: its error frame says why.
            Err(quinn::WriteError::Stopped(code)) => match read_response(&mut self.recv).await {
                Ok(BlobResponse::Error { kind, message }) => Err(refused(kind, message)),
                _ => Err(quinn::WriteError::Stopped(code).into()),
            },
            Err(error) => Err(error.into()),
        }
    }

    /// Ends the upload and waits for the store to verify, fsync and confirm it.
    pub async fn finish(mut self) -> Result<(BlobHash, u64), BlobError> {
        self.finish_inner().await
    }

    async fn finish_inner(&mut self) -> Result<(BlobHash, u64), BlobError> {
        if self.position != self.size {
            return Err(BlobError::Protocol(format!(
                "finishing at {} of {} bytes",
                self.position, self.size
            )));
        }
        let _ = self.send.finish();
        match read_response(&mut self.recv).await? {
            BlobResponse::Stored { hash, size } => Ok((hash, size)),
            BlobResponse::Error { kind, message } => Err(refused(kind, message)),
            other => Err(unexpected(&other)),
        }
    }
}

impl Drop for PutUpload {
    fn drop(&mut self) {
        // quinn finishes a dropped stream gracefully; an unfinished upload must not look like a
        // complete one, so abandon it explicitly (a no-op after `finish`).
        let _ = self.send.reset(STOP_CANCELLED);
    }
}

/// Uploads `bytes` in one go (no resume) and returns the hash the store confirmed.
pub async fn put_bytes(
    connection: &quinn::Connection,
    bytes: Bytes,
) -> Result<BlobHash, BlobError> {
    let hash = BlobHash::of(&bytes);
    let mut upload = start_put(connection, bytes.len() as u64, Some(hash), false).await?;
    let mut offset = 0;
    while offset < bytes.len() {
        let end = (offset + 1024 * 1024).min(bytes.len());
        upload.write(bytes.slice(offset..end)).await?;
        offset = end;
    }
    let (stored, _) = upload.finish().await?;
    if stored != hash {
        return Err(BlobError::Integrity { offset: 0 });
    }
    Ok(stored)
}
