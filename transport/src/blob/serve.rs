//! The server side of `Get`: a blob's bytes and outboard, read from memory or from files (on
//! blocking threads, a batch ahead of the network), streamed as the planned pieces.

use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use horde_protocol::BlobHash;
use horde_protocol::blob::{
    BlobErrorKind, BlobResponse, ByteRange, CV_LEN, Piece, cvs_from_bytes, group_count,
    normalize_ranges, plan, segment_count,
};

use super::{BlobError, within_progress_timeout, write_response};

/// Pieces read from disk per blocking task (up to 4 MiB): the next batch is read while the
/// previous one is sent, so the disk and the network overlap, and a blocking thread only ever
/// waits for the disk, never for the peer.
const READ_AHEAD_PIECES: usize = 4;

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

    pub(super) fn segment_cvs(&self) -> io::Result<Vec<[u8; 32]>> {
        let segments = segment_count(self.size);
        if segments <= 1 {
            return Ok(Vec::new());
        }
        let offset = group_count(self.size) * CV_LEN as u64;
        let bytes = self.outboard.read_at(offset, segments * CV_LEN as u64)?;
        cvs_from_bytes(&bytes)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "outboard length"))
    }

    pub(super) fn read_piece(&self, piece: Piece) -> io::Result<Bytes> {
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

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use horde_protocol::blob::{CHUNK_GROUP_LEN, normalize_ranges, outboard_len, plan};

    use super::*;

    fn sample(size: usize) -> Bytes {
        (0..size)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    #[test]
    fn memory_backing_refuses_reads_past_the_end() {
        let backing = Backing::Memory(Bytes::from_static(b"0123456789"));
        assert_eq!(&backing.read_at(2, 3).unwrap()[..], b"234");
        assert_eq!(
            backing.read_at(8, 3).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            backing.read_at(u64::MAX, 1).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn a_served_blob_has_the_blob_hash_and_a_whole_outboard() {
        for size in [
            0,
            1,
            CHUNK_GROUP_LEN as usize,
            5 * CHUNK_GROUP_LEN as usize + 1,
        ] {
            let bytes = sample(size);
            let (served, hash) = ServedBlob::from_memory(bytes.clone());
            assert_eq!(hash, BlobHash::of(&bytes), "size {size}");
            assert_eq!(served.size, size as u64);
            let Backing::Memory(outboard) = &served.outboard else {
                panic!("in memory");
            };
            assert_eq!(outboard.len() as u64, outboard_len(size as u64));
        }
    }

    #[test]
    fn a_file_backed_blob_reads_the_same_pieces_sequentially() {
        let bytes = sample(7 * CHUNK_GROUP_LEN as usize + 123);
        let (memory, _) = ServedBlob::from_memory(bytes.clone());
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        let from_file = ServedBlob {
            size: memory.size,
            data: Backing::File(Arc::new(file)),
            outboard: memory.outboard.clone(),
        };
        let ranges = normalize_ranges(
            &[ByteRange {
                start: CHUNK_GROUP_LEN,
                end: 3 * CHUNK_GROUP_LEN + 7,
            }],
            memory.size,
        )
        .unwrap();
        let mut reader = SequentialReader::new(from_file.clone());
        assert!(reader.private.is_some(), "reopened through /proc");
        for piece in plan(memory.size, &ranges) {
            let expected = memory.read_piece(piece).unwrap();
            assert_eq!(reader.read_piece(piece).unwrap(), expected);
            assert_eq!(from_file.read_piece(piece).unwrap(), expected);
        }
        // Past the end fails on both paths.
        let past = Piece::Data {
            offset: memory.size - 1,
            len: 2,
        };
        assert!(reader.read_piece(past).is_err());
        assert!(from_file.read_piece(past).is_err());
    }
}
