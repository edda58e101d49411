//! The client side of `Get`: [`request_get`] checks the header, and [`GetStream`] receives the
//! body on a task of its own, verified, into the caller's choice of destination.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use horde_protocol::BlobHash;
use horde_protocol::blob::{
    BlobRequest, BlobResponse, ByteRange, normalize_ranges, plan, root_of, segment_count,
};
use tokio::sync::{mpsc, watch};

use super::sink::{
    ChannelSink, Destination, Output, Sink, WRITE_QUEUE, WholeSink, WriterSink, WrittenWindow,
};
use super::verify::{Tree, Verifier};
use super::{
    BlobBuffer, BlobError, STOP_INTEGRITY, STOP_TOO_LARGE, VerifiedSink, read_response, refused,
    unexpected, within_progress_timeout, write_request,
};
use crate::codes;

/// Verified bytes of a blob: `bytes` is the blob's content at `offset..offset + bytes.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedData {
    /// Where these bytes sit in the blob.
    pub offset: u64,
    /// The bytes, already checked against the blob hash.
    pub bytes: Bytes,
}

/// Verified runs queued for [`GetStream::next`].
const OUTPUT_QUEUE: usize = 4;

/// How often a read into memory reports its verified position while it grows.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

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
    let tree = Tree::new(hash, size, segment_cvs, pieces);
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
        let (mut dest, accepted, result) = self.read_whole(dest, held, size, &mut |_| {}).await?;
        dest.truncate(accepted);
        *buffer = dest;
        result
    }

    /// Receives the whole response into `buffer`, like [`Self::read_to_vec`]: `buffer` must
    /// hold exactly the blob's bytes before the first requested range, and on return holds only
    /// verified bytes (on an error, the verified prefix, for a resume). A buffer without room for
    /// the blob is replaced by a larger one (its prefix copied over): from [`MAPPED_MIN`](super::MAPPED_MIN) on, a
    /// mapping whose pages are faulted in a MiB at a time just ahead of the data, one system
    /// call each instead of a page fault per 4 KiB (≈ 20% less CPU for the fresh memory). A buffer with room (a
    /// [`BlobBuffer::clear`]ed one) is filled in place. Returns the bytes read from the stream
    /// after the header.
    pub async fn read_to_buffer(self, buffer: &mut BlobBuffer) -> Result<u64, BlobError> {
        self.read_to_buffer_with_progress(buffer, &mut |_| {}).await
    }

    /// [`Self::read_to_buffer`], calling `progress` with the blob position verified so far
    /// (the buffer's prefix included) every [`PROGRESS_INTERVAL`] while bytes arrive, and once
    /// at the end.
    pub async fn read_to_buffer_with_progress(
        self,
        buffer: &mut BlobBuffer,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<u64, BlobError> {
        let held = buffer.len();
        let size = self.whole_size(held as u64)?;
        buffer.reserve_total(size);
        let dest = std::mem::take(buffer);
        let (mut dest, accepted, result) = self.read_whole(dest, held, size, progress).await?;
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
    /// bytes), calling `progress` with the verified position every [`PROGRESS_INTERVAL`] while
    /// it grows and once at the end. Returns the destination, how much of it is verified, and
    /// the outcome; `Err` only if the receiving task itself failed.
    async fn read_whole<D: Destination + 'static>(
        mut self,
        dest: D,
        held: usize,
        size: usize,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(D, usize, Result<u64, BlobError>), BlobError> {
        let Some((recv, tree)) = self.setup.take() else {
            return Err(BlobError::Protocol(
                "the transfer already started".to_owned(),
            ));
        };
        // The receiving task publishes its verified position after each batch of frames (one
        // relaxed store); this task reads it at a human pace.
        let position = Arc::new(AtomicU64::new(held as u64));
        let sink = WholeSink {
            dest,
            accepted: held,
            end: size,
            position: Some(Arc::clone(&position)),
        };
        let mut task = self.start_receiver(recv, tree, sink, held as u64);
        let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported = held as u64;
        let joined = loop {
            tokio::select! {
                joined = &mut task => break joined,
                _ = ticks.tick() => {
                    let now = position.load(Ordering::Relaxed);
                    if now != reported {
                        reported = now;
                        progress(now);
                    }
                }
            }
        };
        let (verifier, result) = joined.map_err(io::Error::other)?;
        let WholeSink { dest, accepted, .. } = verifier.sink;
        progress(accepted as u64);
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use horde_protocol::blob::CHUNK_GROUP_LEN;

    use super::*;
    use crate::blob::{Backing, PROGRESS_TIMEOUT, ServedBlob, read_request, serve_get};
    use crate::test_utils::connected_pair;

    fn sample(size: usize) -> Bytes {
        (0..size)
            .map(|i| (i % 241) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    /// Serves `blob` for every `Get` on the pair's server side; returns the client connection.
    async fn serving(blob: ServedBlob) -> (quinn::Connection, crate::test_utils::ConnectedPair) {
        let pair = connected_pair().await;
        let server = pair.server.clone();
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = server.accept_bi().await {
                let blob = blob.clone();
                tokio::spawn(async move {
                    if let Ok(Some(BlobRequest::Get { ranges, .. })) = read_request(&mut recv).await
                    {
                        let _ = serve_get(&mut send, &blob, &ranges, PROGRESS_TIMEOUT).await;
                    }
                });
            }
        });
        (pair.client.clone(), pair)
    }

    #[tokio::test]
    async fn gets_ranges_and_whole_blobs_verified() {
        let bytes = sample(9 * CHUNK_GROUP_LEN as usize + 17);
        let (blob, hash) = ServedBlob::from_memory(bytes.clone());
        let (connection, _pair) = serving(blob).await;

        let range = ByteRange {
            start: 2 * CHUNK_GROUP_LEN + 1,
            end: 4 * CHUNK_GROUP_LEN,
        };
        let mut get = request_get(&connection, hash, vec![range], u64::MAX, PROGRESS_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(get.size(), bytes.len() as u64);
        // Widened to whole chunk groups.
        let widened = 2 * CHUNK_GROUP_LEN..4 * CHUNK_GROUP_LEN;
        assert_eq!(get.ranges(), std::slice::from_ref(&widened));
        let mut received = Vec::new();
        while let Some(data) = get.next().await.unwrap() {
            assert_eq!(data.offset, 2 * CHUNK_GROUP_LEN + received.len() as u64);
            received.extend_from_slice(&data.bytes);
        }
        assert_eq!(
            received,
            bytes[2 * CHUNK_GROUP_LEN as usize..4 * CHUNK_GROUP_LEN as usize]
        );

        // A resume: the first bytes held, the rest into the same buffer.
        let held = 3 * CHUNK_GROUP_LEN as usize;
        let mut buffer = bytes[..held].to_vec();
        let get = request_get(
            &connection,
            hash,
            vec![ByteRange::from_offset(held as u64)],
            u64::MAX,
            PROGRESS_TIMEOUT,
        )
        .await
        .unwrap();
        get.read_to_vec(&mut buffer).await.unwrap();
        assert_eq!(buffer, bytes);
    }

    #[tokio::test]
    async fn refuses_a_blob_over_the_limit_and_one_that_does_not_match() {
        let bytes = sample(4 * CHUNK_GROUP_LEN as usize);
        let (blob, hash) = ServedBlob::from_memory(bytes.clone());
        // The same outboard, one corrupted byte in the third chunk group.
        let mut corrupted = bytes.to_vec();
        corrupted[2 * CHUNK_GROUP_LEN as usize + 9] ^= 1;
        let bad = ServedBlob {
            data: Backing::Memory(corrupted.into()),
            ..blob.clone()
        };
        let (connection, _pair) = serving(bad).await;

        let error = request_get(&connection, hash, Vec::new(), 1000, PROGRESS_TIMEOUT)
            .await
            .unwrap_err();
        assert!(
            matches!(error, BlobError::TooLarge { size, max: 1000 } if size == bytes.len() as u64),
            "{error}"
        );

        let mut get = request_get(&connection, hash, Vec::new(), u64::MAX, PROGRESS_TIMEOUT)
            .await
            .unwrap();
        let mut verified = 0;
        let error = loop {
            match get.next().await {
                Ok(Some(data)) => verified += data.bytes.len(),
                Ok(None) => panic!("a corrupted blob was accepted"),
                Err(error) => break error,
            }
        };
        assert!(
            matches!(error, BlobError::Integrity { offset } if offset == 2 * CHUNK_GROUP_LEN),
            "{error}"
        );
        assert_eq!(verified, 2 * CHUNK_GROUP_LEN as usize);
        // Asked for another hash, the first CV block already fails, before any data.
        let other = BlobHash::of(b"another blob");
        let mut get = request_get(&connection, other, Vec::new(), u64::MAX, PROGRESS_TIMEOUT)
            .await
            .unwrap();
        assert!(matches!(
            get.next().await,
            Err(BlobError::Integrity { offset: 0 })
        ));
    }
}
