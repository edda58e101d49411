//! The `horde/blob/1` protocol over QUIC: one bidirectional stream per request.
//!
//! The messages and the verification tree are sans-IO in [`horde_protocol::blob`]; this module
//! moves them over quinn streams:
//! - client side: [`request_get`] returns a [`GetStream`] whose [`GetStream::next`] yields only
//!   *verified* data (every chunk group checked against the root hash before it is handed out);
//!   [`start_put`] returns a [`PutUpload`]; [`stat`] asks what the store holds.
//! - server side: [`read_request`], [`write_response`] and [`serve_get`], which streams a
//!   [`ServedBlob`] (bytes plus outboard, in memory or in files).
//!
//! A receiver that finds a bad chunk group stops the stream with [`STOP_INTEGRITY`] and returns
//! [`BlobError::Integrity`]; data verified before the failure is still handed out first, so a
//! resume never re-fetches more than one chunk group beyond what is missing.

use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use horde_protocol::BlobHash;
use horde_protocol::blob::{
    BlobErrorKind, BlobRequest, BlobResponse, BlobStatus, ByteRange, CHUNK_GROUP_LEN, CV_LEN,
    MAX_REQUEST_LEN, MAX_RESPONSE_LEN, Piece, SEGMENT_LEN, cvs_from_bytes, group_count,
    normalize_ranges, parent_cv_of, plan, root_of, segment_count, subtree_cv,
};
use horde_protocol::codec::encode_frame;
use quinn::VarInt;
use serde::de::DeserializeOwned;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;

use crate::framed::{ChannelError, FrameReader};

/// Stream stop code: the receiver found data that does not match the hash.
pub const STOP_INTEGRITY: VarInt = VarInt::from_u32(0x10);
/// Stream stop code: the receiver refuses a blob larger than its limit.
pub const STOP_TOO_LARGE: VarInt = VarInt::from_u32(0x11);
/// Stream stop code: the receiver no longer wants the data (cancelled, local failure).
pub const STOP_CANCELLED: VarInt = VarInt::from_u32(0x12);

/// Pieces read ahead from disk while the previous ones are being sent.
const READ_AHEAD_PIECES: usize = 4;

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
}

impl BlobError {
    /// Whether retrying on a new connection may succeed (the connection or stream was lost).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Read(_) | Self::Write(_) | Self::Connection(_) | Self::Truncated { .. } => true,
            Self::Channel(ChannelError::Read(_) | ChannelError::Write(_)) => true,
            Self::Refused { kind, .. } => *kind == BlobErrorKind::Busy,
            _ => false,
        }
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
pub async fn serve_get(
    send: &mut quinn::SendStream,
    blob: &ServedBlob,
    ranges: &[ByteRange],
) -> Result<u64, BlobError> {
    let normalized = match normalize_ranges(ranges, blob.size) {
        Ok(normalized) => normalized,
        Err(error) => {
            let message = error.to_string();
            write_response(
                send,
                &BlobResponse::Error {
                    kind: BlobErrorKind::BadRequest,
                    message: message.clone(),
                },
            )
            .await?;
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
    write_response(
        send,
        &BlobResponse::Header {
            size: blob.size,
            segment_cvs,
        },
    )
    .await?;
    let pieces = plan(blob.size, &normalized);
    let mut sent = 0u64;
    if blob.data.is_memory() && blob.outboard.is_memory() {
        for piece in pieces {
            let bytes = blob.read_piece(piece)?;
            sent += bytes.len() as u64;
            send.write_chunk(bytes).await?;
        }
    } else {
        // Disk reads run on a blocking thread, a few pieces ahead of the network.
        let (sender, mut receiver) = mpsc::channel::<io::Result<Bytes>>(READ_AHEAD_PIECES);
        let reader_blob = blob.clone();
        let reader = tokio::task::spawn_blocking(move || {
            for piece in pieces {
                let result = reader_blob.read_piece(piece);
                let failed = result.is_err();
                if sender.blocking_send(result).is_err() || failed {
                    break;
                }
            }
        });
        while let Some(bytes) = receiver.recv().await {
            let bytes = bytes?;
            sent += bytes.len() as u64;
            send.write_chunk(bytes).await?;
        }
        reader.await.map_err(io::Error::other)?;
    }
    let _ = send.finish();
    Ok(sent)
}

/// Verified bytes of a blob: `bytes` is the blob's content at `offset..offset + bytes.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedData {
    /// Where these bytes sit in the blob.
    pub offset: u64,
    /// The bytes, already checked against the blob hash.
    pub bytes: Bytes,
}

/// The client side of a `Get` after the header: yields verified data in blob order.
#[derive(Debug)]
pub struct GetStream {
    recv: quinn::RecvStream,
    hash: BlobHash,
    size: u64,
    ranges: Vec<Range<u64>>,
    segment_cvs: Vec<[u8; 32]>,
    pieces: std::vec::IntoIter<Piece>,
    group_cvs: Vec<[u8; 32]>,
    first_group: u64,
    pending_error: Option<BlobError>,
    wire_bytes: u64,
    scratch: BytesMut,
}

/// Client side of `Get`: opens a stream on `connection`, asks for `ranges` of `hash` (empty:
/// everything) and checks the header: the size against `max_size`, the segment CVs against the
/// hash.
pub async fn request_get(
    connection: &quinn::Connection,
    hash: BlobHash,
    ranges: Vec<ByteRange>,
    max_size: u64,
) -> Result<GetStream, BlobError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    write_request(
        &mut send,
        &BlobRequest::Get {
            hash,
            ranges: ranges.clone(),
        },
    )
    .await?;
    let _ = send.finish();
    let (size, segment_cvs) = match read_response(&mut recv).await? {
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
    Ok(GetStream {
        recv,
        hash,
        size,
        ranges: normalized,
        segment_cvs,
        pieces: pieces.into_iter(),
        group_cvs: Vec::new(),
        first_group: 0,
        pending_error: None,
        wire_bytes: 0,
        scratch: BytesMut::new(),
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
        self.wire_bytes
    }

    /// The next run of verified bytes, `Ok(None)` when every requested range was delivered.
    ///
    /// On a bad chunk group the stream is stopped with [`STOP_INTEGRITY`] and
    /// [`BlobError::Integrity`] is returned. When a failure happens inside a piece, the groups
    /// verified before it are returned first and the error on the next call.
    pub async fn next(&mut self) -> Result<Option<VerifiedData>, BlobError> {
        if let Some(error) = self.pending_error.take() {
            return Err(error);
        }
        loop {
            let Some(piece) = self.pieces.next() else {
                return Ok(None);
            };
            match piece {
                Piece::GroupCvs {
                    segment,
                    first_group,
                    count,
                } => {
                    let mut buffer = vec![0u8; (count * CV_LEN as u64) as usize];
                    self.read_full(&mut buffer).await?;
                    let cvs = cvs_from_bytes(&buffer)
                        .ok_or_else(|| BlobError::Protocol("bad CV block".to_owned()))?;
                    let valid = if self.segment_cvs.is_empty() {
                        root_of(&cvs) == Some(self.hash)
                    } else {
                        self.segment_cvs
                            .get(segment as usize)
                            .is_some_and(|expected| parent_cv_of(&cvs).as_ref() == Some(expected))
                    };
                    if !valid {
                        return Err(self.integrity_failure(segment * SEGMENT_LEN));
                    }
                    self.group_cvs = cvs;
                    self.first_group = first_group;
                }
                Piece::Data { offset, len } => return self.read_data(offset, len).await.map(Some),
            }
        }
    }

    async fn read_data(&mut self, offset: u64, len: u64) -> Result<VerifiedData, BlobError> {
        // One buffer reused across pieces: once the caller dropped the previous piece, `reserve`
        // reclaims the same allocation (no fresh pages to fault in), and `read_buf` fills it
        // without zeroing first.
        self.scratch.clear();
        self.scratch.reserve(len as usize);
        let mut verified = 0usize;
        while (verified as u64) < len {
            let group_len = (len - verified as u64).min(CHUNK_GROUP_LEN) as usize;
            let group_offset = offset + verified as u64;
            let result = match self.fill_scratch(verified + group_len).await {
                Ok(()) => {
                    let group = &self.scratch[verified..verified + group_len];
                    if self.group_is_valid(group_offset, group) {
                        Ok(())
                    } else {
                        Err(self.integrity_failure(group_offset))
                    }
                }
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                if verified == 0 {
                    return Err(error);
                }
                self.pending_error = Some(error);
                break;
            }
            verified += group_len;
        }
        Ok(VerifiedData {
            offset,
            bytes: self.scratch.split_to(verified).freeze(),
        })
    }

    /// Reads until the scratch buffer holds `target` bytes.
    async fn fill_scratch(&mut self, target: usize) -> Result<(), BlobError> {
        while self.scratch.len() < target {
            let missing = target - self.scratch.len();
            let read = (&mut self.recv)
                .take(missing as u64)
                .read_buf(&mut self.scratch)
                .await
                .map_err(|error| match error.downcast::<quinn::ReadError>() {
                    Ok(read) => BlobError::Read(read),
                    Err(error) => BlobError::Io(error),
                })?;
            if read == 0 {
                return Err(BlobError::Truncated {
                    missing: missing as u64,
                });
            }
            self.wire_bytes += read as u64;
        }
        Ok(())
    }

    fn group_is_valid(&self, offset: u64, group: &[u8]) -> bool {
        if self.size <= CHUNK_GROUP_LEN {
            return BlobHash::of(group) == self.hash;
        }
        let index = (offset / CHUNK_GROUP_LEN).checked_sub(self.first_group);
        index
            .and_then(|index| self.group_cvs.get(index as usize))
            .is_some_and(|expected| subtree_cv(offset, group) == *expected)
    }

    fn integrity_failure(&mut self, offset: u64) -> BlobError {
        let _ = self.recv.stop(STOP_INTEGRITY);
        BlobError::Integrity { offset }
    }

    async fn read_full(&mut self, buffer: &mut [u8]) -> Result<(), BlobError> {
        let mut filled = 0;
        while filled < buffer.len() {
            match self.recv.read(&mut buffer[filled..]).await? {
                Some(read) => {
                    filled += read;
                    self.wire_bytes += read as u64;
                }
                None => {
                    return Err(BlobError::Truncated {
                        missing: (buffer.len() - filled) as u64,
                    });
                }
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
