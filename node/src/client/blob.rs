//! Client side of `horde/blob/1`: put a file, get a blob into a file (resumable) or into memory,
//! with progress reporting.
//!
//! - [`put_file`], [`get_to_file`], [`get_to_memory`]: connect, transfer, retry transient failures
//!   (connection lost, stream stalled, store busy) as a [`TransferPolicy`] says: a bounded number
//!   of attempts with exponential backoff, resuming where the last attempt stopped, and a bounded
//!   total time spent dialing a node that does not answer ([`TransferError::Unreachable`]).
//! - [`get_to_file_once`]: one attempt on a given connection (resuming from `DEST.partial`);
//!   [`get_into_buffer`], [`get_into_vec`]: one in-memory attempt (resuming from the buffer).
//! - [`Progress`], [`ProgressReporter`]: bytes, rate and ETA, redrawn on one line on a terminal,
//!   plain periodic lines otherwise.
//!
//! A download goes to `DEST.partial` with its verified length recorded in `DEST.partial.state`
//! (after an fsync of the data); only a fully verified blob is renamed to `DEST`. An integrity
//! failure deletes the partial: nothing is left at or beside `DEST`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use horde_protocol::blob::ByteRange;
use horde_protocol::{BlobHash, Hotkey, NodeAddr};
use horde_transport::blob::{
    BlobBuffer, BlobError, GetStream, PROGRESS_TIMEOUT, VerifiedSink, request_get, start_put,
    within_progress_timeout,
};
use horde_transport::{ALPN_BLOB, ConnectError, HordeEndpoint};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::client::progress::{NoProgress, Progress};

/// Attempts per transfer before giving up on transient failures (connection lost, reset,
/// stalled, busy).
pub const MAX_ATTEMPTS: u32 = 5;

/// First retry delay; doubled after every failed attempt (0.2, 0.4, 0.8, 1.6 s).
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);

/// Total time a transfer spends on dials that fail before it reports the storage node
/// unreachable: 15 s, one full handshake timeout ([`horde_transport::HANDSHAKE_TIMEOUT`], 10 s)
/// plus a shorter second try for a first flight lost on the way. Without it a dead node costs
/// every attempt a whole handshake timeout (5 × 10 s).
pub const DIAL_BUDGET: Duration = Duration::from_secs(15);

/// How a client transfer retries and when it gives up. [`Default`] is the documented constants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferPolicy {
    /// Attempts before giving up on transient failures ([`MAX_ATTEMPTS`]).
    pub max_attempts: u32,
    /// First retry delay, doubled after every failed attempt ([`INITIAL_BACKOFF`]).
    pub initial_backoff: Duration,
    /// Total time spent on failed dials before [`TransferError::Unreachable`] ([`DIAL_BUDGET`]);
    /// each dial is cut off when it runs out.
    pub dial_budget: Duration,
    /// How long a transfer may receive nothing before it fails as stalled (and is retried)
    /// ([`PROGRESS_TIMEOUT`]).
    pub progress_timeout: Duration,
}

impl Default for TransferPolicy {
    fn default() -> Self {
        Self {
            max_attempts: MAX_ATTEMPTS,
            initial_backoff: INITIAL_BACKOFF,
            dial_budget: DIAL_BUDGET,
            progress_timeout: PROGRESS_TIMEOUT,
        }
    }
}

/// Download progress is made durable (data fsynced, verified length recorded) every 64 MiB, so a
/// crash loses at most that much verified work.
const CHECKPOINT_BYTES: u64 = 64 << 20;

/// File bytes read per upload chunk.
const UPLOAD_CHUNK: usize = 1 << 20;

/// File chunks read ahead of the network on upload.
const DISK_QUEUE: usize = 8;

/// A client transfer that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The storage address lists no socket address.
    #[error("storage node {0} has no address")]
    NoAddress(Hotkey),
    /// Dialing the storage node failed.
    #[error("connecting to the storage node: {0}")]
    Connect(#[from] ConnectError),
    /// Dials to the storage node kept failing for the whole [`TransferPolicy::dial_budget`].
    #[error("storage node {hotkey} unreachable: no connection within {tried_for:.1?} ({last})")]
    Unreachable {
        /// The node.
        hotkey: Hotkey,
        /// Time spent on failed dials.
        tried_for: Duration,
        /// Why the last dial failed (boxed: rare, and it would double the size of every
        /// `TransferError`).
        last: Box<ConnectError>,
    },
    /// The transfer failed (integrity, not found, refused, connection lost, …).
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The store stored our upload under another hash than the file's.
    #[error("storage node stored {actual}, expected {expected}")]
    HashMismatch {
        /// The file's hash.
        expected: BlobHash,
        /// What the node answered.
        actual: BlobHash,
    },
    /// The blob's size differs from what the caller expected.
    #[error("blob is {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// Expected.
        expected: u64,
        /// Announced.
        actual: u64,
    },
    /// Local file I/O failed.
    #[error("local file: {0}")]
    Io(#[from] io::Error),
}

impl TransferError {
    /// Whether this is a data-integrity failure (the node served bytes not matching the hash).
    pub fn is_integrity(&self) -> bool {
        matches!(self, Self::Blob(BlobError::Integrity { .. }))
    }

    fn is_transient(&self) -> bool {
        match self {
            Self::Blob(error) => error.is_transient(),
            Self::Connect(ConnectError::TimedOut(_) | ConnectError::Connection(_)) => true,
            _ => false,
        }
    }
}

/// Dials the storage node on `horde/blob/1`, trying its addresses in order.
pub async fn connect(
    endpoint: &HordeEndpoint,
    storage: &NodeAddr,
) -> Result<quinn::Connection, TransferError> {
    match endpoint.connect_node(storage, ALPN_BLOB).await {
        Ok(connection) => Ok(connection),
        Err(ConnectError::NoAddress) => Err(TransferError::NoAddress(storage.hotkey)),
        Err(error) => Err(TransferError::Connect(error)),
    }
}

/// The retries of one transfer under a [`TransferPolicy`]: attempts with a doubling delay, and
/// the time spent on failed dials.
#[derive(Debug)]
struct Retries<'a> {
    policy: &'a TransferPolicy,
    attempt: u32,
    delay: Duration,
    failed_dialing: Duration,
}

impl<'a> Retries<'a> {
    fn new(policy: &'a TransferPolicy) -> Self {
        Self {
            policy,
            attempt: 1,
            delay: policy.initial_backoff,
            failed_dialing: Duration::ZERO,
        }
    }

    /// Dials `storage` within what is left of the dial budget; once it is spent the node is
    /// reported unreachable (not transient: no more attempts).
    async fn connect(
        &mut self,
        endpoint: &HordeEndpoint,
        storage: &NodeAddr,
    ) -> Result<quinn::Connection, TransferError> {
        let left = self.policy.dial_budget.saturating_sub(self.failed_dialing);
        let started = tokio::time::Instant::now();
        let error = match tokio::time::timeout(left, connect(endpoint, storage)).await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(error)) => error,
            Err(_) => TransferError::Connect(ConnectError::TimedOut(left)),
        };
        self.failed_dialing += started.elapsed();
        match error {
            TransferError::Connect(last) if self.failed_dialing >= self.policy.dial_budget => {
                Err(TransferError::Unreachable {
                    hotkey: storage.hotkey,
                    tried_for: self.failed_dialing,
                    last: Box::new(last),
                })
            }
            error => Err(error),
        }
    }

    /// Whether to try again after `error`; sleeps the backoff delay first.
    async fn again(&mut self, error: &TransferError, what: &str) -> bool {
        if !error.is_transient() || self.attempt >= self.policy.max_attempts {
            return false;
        }
        info!(%error, attempt = self.attempt, "{what} interrupted, retrying in {:?}", self.delay);
        tokio::time::sleep(self.delay).await;
        self.delay *= 2;
        self.attempt += 1;
        true
    }
}

/// The BLAKE3 of a file (blocking).
pub fn hash_file(path: &Path) -> io::Result<(BlobHash, u64)> {
    hash_reader(File::open(path)?)
}

/// The BLAKE3 and length of everything `reader` yields (blocking).
pub fn hash_reader(mut reader: impl io::Read) -> io::Result<(BlobHash, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; UPLOAD_CHUNK];
    let mut size = 0u64;
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((BlobHash(*hasher.finalize().as_bytes()), size))
}

/// Uploads a file to a storage node and returns its hash once the node stored and fsynced it.
///
/// The file is hashed first so the upload declares its hash: an interrupted upload resumes where
/// the node's partial copy ends.
pub async fn put_file(
    endpoint: &HordeEndpoint,
    storage: &NodeAddr,
    path: &Path,
    policy: &TransferPolicy,
    progress: &mut dyn Progress,
) -> Result<BlobHash, TransferError> {
    let owned = path.to_owned();
    let (hash, size) = tokio::task::spawn_blocking(move || hash_file(&owned))
        .await
        .map_err(io::Error::other)??;
    put_hashed_file(endpoint, storage, path, hash, size, policy, progress).await
}

/// [`put_file`] for a file whose `hash` and `size` the caller has computed already (no second
/// pass over it).
pub async fn put_hashed_file(
    endpoint: &HordeEndpoint,
    storage: &NodeAddr,
    path: &Path,
    hash: BlobHash,
    size: u64,
    policy: &TransferPolicy,
    progress: &mut dyn Progress,
) -> Result<BlobHash, TransferError> {
    let mut retries = Retries::new(policy);
    let result = loop {
        let result = match retries.connect(endpoint, storage).await {
            Ok(connection) => {
                put_file_once(
                    &connection,
                    path,
                    hash,
                    size,
                    progress,
                    policy.progress_timeout,
                )
                .await
            }
            Err(error) => Err(error),
        };
        match result {
            Err(error) if retries.again(&error, "upload").await => {}
            result => break result,
        }
    };
    progress.finish();
    result
}

/// One upload attempt on `connection` of the file at `path` with known `hash` and `size`. The
/// store must answer the request, and take each piece, within `progress_timeout`
/// ([`BlobError::Stalled`] otherwise, retried by [`put_file`]); its final answer, which follows
/// verifying and fsyncing the whole blob, has no such bound.
pub async fn put_file_once(
    connection: &quinn::Connection,
    path: &Path,
    hash: BlobHash,
    size: u64,
    progress: &mut dyn Progress,
    progress_timeout: Duration,
) -> Result<BlobHash, TransferError> {
    let mut upload = within_progress_timeout(
        progress_timeout,
        start_put(connection, size, Some(hash), true),
    )
    .await?;
    let offset = upload.offset();
    progress.start(size, offset);
    let (sender, mut chunks) = mpsc::channel::<io::Result<Bytes>>(DISK_QUEUE);
    let path = path.to_owned();
    let reader = tokio::task::spawn_blocking(move || {
        let read = || -> io::Result<()> {
            let mut file = File::open(&path)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut remaining = size - offset;
            while remaining > 0 {
                let mut buffer = vec![0u8; (remaining as usize).min(UPLOAD_CHUNK)];
                file.read_exact(&mut buffer)?;
                remaining -= buffer.len() as u64;
                if sender.blocking_send(Ok(Bytes::from(buffer))).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        if let Err(error) = read() {
            let _ = sender.blocking_send(Err(error));
        }
    });
    while let Some(chunk) = chunks.recv().await {
        within_progress_timeout(progress_timeout, upload.write(chunk?)).await?;
        progress.update(upload.position());
    }
    reader.await.map_err(io::Error::other)?;
    let (stored, _) = upload.finish().await?;
    if stored != hash {
        return Err(TransferError::HashMismatch {
            expected: hash,
            actual: stored,
        });
    }
    Ok(stored)
}

/// What a completed download did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetOutcome {
    /// The blob's size.
    pub size: u64,
    /// Verified bytes already held when the last attempt started.
    pub resumed_from: u64,
    /// Bytes read from the network by the last attempt (CVs and data).
    pub fetched: u64,
}

/// Downloads a blob into `dest`, resuming from `DEST.partial`, retrying transient failures as
/// `policy` says. `expected_size`, when given, is checked against the node's answer before any
/// data is taken.
#[expect(
    clippy::too_many_arguments,
    reason = "each is one independent knob of the download"
)]
pub async fn get_to_file(
    endpoint: &HordeEndpoint,
    storage: &NodeAddr,
    hash: BlobHash,
    dest: &Path,
    expected_size: Option<u64>,
    max_size: u64,
    policy: &TransferPolicy,
    progress: &mut dyn Progress,
) -> Result<GetOutcome, TransferError> {
    let mut retries = Retries::new(policy);
    let result = loop {
        let result = match retries.connect(endpoint, storage).await {
            Ok(connection) => {
                let timeout = policy.progress_timeout;
                get_to_file_once(
                    &connection,
                    hash,
                    dest,
                    expected_size,
                    max_size,
                    timeout,
                    progress,
                )
                .await
            }
            Err(error) => Err(error),
        };
        match result {
            Err(error) if retries.again(&error, "download").await => {}
            result => break result,
        }
    };
    progress.finish();
    result
}

/// Paths of a download in progress.
fn partial_paths(dest: &Path) -> (PathBuf, PathBuf) {
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut state = partial.as_os_str().to_owned();
    state.push(".state");
    (partial, PathBuf::from(state))
}

/// The verified length recorded for `hash` in a state file, if it matches and the partial
/// file holds at least that much.
fn recorded_progress(partial: &Path, state: &Path, hash: &BlobHash) -> Option<u64> {
    let text = fs::read_to_string(state).ok()?;
    let (recorded_hash, length) = text.trim().split_once(' ')?;
    if recorded_hash != hash.to_string() {
        return None;
    }
    let length: u64 = length.parse().ok()?;
    let actual = fs::symlink_metadata(partial).ok()?;
    (actual.is_file() && actual.len() >= length).then_some(length)
}

fn record_progress(state: &Path, hash: &BlobHash, length: u64) -> io::Result<()> {
    let mut file = File::create(state)?;
    file.write_all(format!("{hash} {length}\n").as_bytes())?;
    file.sync_data()
}

fn remove_partial(partial: &Path, state: &Path) {
    let _ = fs::remove_file(partial);
    let _ = fs::remove_file(state);
}

/// One download attempt on `connection`: continues `DEST.partial` if its state file records
/// verified progress for `hash`, fetches only the missing range, renames to `dest` once all of
/// it is verified and fsynced. On an integrity failure the partial is deleted; when the node
/// sends nothing for `progress_timeout` the attempt fails with [`BlobError::Stalled`] and the
/// verified part stays recorded for a resume.
pub async fn get_to_file_once(
    connection: &quinn::Connection,
    hash: BlobHash,
    dest: &Path,
    expected_size: Option<u64>,
    max_size: u64,
    progress_timeout: Duration,
    progress: &mut dyn Progress,
) -> Result<GetOutcome, TransferError> {
    let (partial, state) = partial_paths(dest);
    let resumed_from = recorded_progress(&partial, &state, &hash).unwrap_or(0);
    let ranges = if resumed_from > 0 {
        vec![ByteRange::from_offset(resumed_from)]
    } else {
        Vec::new()
    };
    let max_size = expected_size.map_or(max_size, |size| size.min(max_size));
    let stream = match request_get(connection, hash, ranges, max_size, progress_timeout).await {
        Ok(stream) => stream,
        Err(error @ BlobError::Integrity { .. }) => {
            remove_partial(&partial, &state);
            return Err(error.into());
        }
        Err(error) => return Err(error.into()),
    };
    let size = stream.size();
    if let Some(expected) = expected_size
        && expected != size
    {
        return Err(TransferError::SizeMismatch {
            expected,
            actual: size,
        });
    }
    let start = stream.ranges().first().map_or(size, |range| range.start);
    if start != resumed_from.min(size) {
        return Err(BlobError::Protocol(format!(
            "resume at {resumed_from}, node starts at {start}"
        ))
        .into());
    }
    progress.start(size, start);

    // Verified bytes are written on a writer thread, straight from the aligned windows they were
    // verified in.
    let writer = {
        let (partial, state) = (partial.clone(), state.clone());
        tokio::task::spawn_blocking(move || PartialWriter::open(partial, state, hash, start, size))
            .await
            .map_err(io::Error::other)??
    };
    let (writer, network) = stream
        .read_to_sink(writer, &mut |position| progress.update(position))
        .await;
    // Whatever happened, make what was written durable and record it for a resume.
    let written = match writer {
        Some(writer) => tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(io::Error::other)?,
        None => Err(io::Error::other("the download's writer thread failed")),
    };
    let fetched = match network {
        Err(error @ BlobError::Integrity { .. }) => {
            remove_partial(&partial, &state);
            return Err(error.into());
        }
        Err(error) => return Err(error.into()),
        Ok(fetched) => fetched,
    };
    let written = written?;
    if written != size {
        return Err(BlobError::Truncated {
            missing: size - written.min(size),
        }
        .into());
    }
    fs::rename(&partial, dest)?;
    let _ = fs::remove_file(&state);
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)?.sync_all()?;
    }
    Ok(GetOutcome {
        size,
        resumed_from: start,
        fetched,
    })
}

/// The disk side of a download: writes verified data from `start` with positional writes,
/// checkpoints every [`CHECKPOINT_BYTES`] on a helper thread (data fsynced, then the length
/// recorded) so the writer never waits for an fsync, and on [`Self::finish`] fsyncs and records
/// the final length.
#[derive(Debug)]
struct PartialWriter {
    file: File,
    /// The same file opened for direct I/O (`O_DIRECT`), for whole aligned windows: they go
    /// from the verified buffer to the disk without a copy into fresh page-cache pages (the
    /// copy cost more CPU than verifying). `None` where the file system refuses it.
    direct: Option<File>,
    state: PathBuf,
    hash: BlobHash,
    length: u64,
    checkpoint: u64,
    checkpoints: Option<Checkpoints>,
}

/// Alignment of offsets, lengths and buffers for direct writes ([`horde_transport::blob::SINK_ALIGN`],
/// which the verified windows have).
const DIRECT_ALIGN: u64 = horde_transport::blob::SINK_ALIGN as u64;

/// `O_DIRECT`, for [`std::os::unix::fs::OpenOptionsExt::custom_flags`].
fn direct_io_flag() -> i32 {
    rustix::fs::OFlags::DIRECT.bits() as i32
}

/// The helper thread that makes verified progress durable while the download goes on.
#[derive(Debug)]
struct Checkpoints {
    /// Verified lengths to make durable; holds one, so a slow disk only makes checkpoints rarer.
    lengths: std::sync::mpsc::SyncSender<u64>,
    thread: std::thread::JoinHandle<io::Result<()>>,
}

impl Checkpoints {
    fn start(file: File, state: PathBuf, hash: BlobHash) -> io::Result<Self> {
        let (lengths, pending) = std::sync::mpsc::sync_channel::<u64>(1);
        let thread = std::thread::Builder::new()
            .name("blob-checkpoint".into())
            .spawn(move || {
                // Every byte below `length` was written before it was sent: after the fsync
                // they are on disk, and only then is the length recorded.
                for length in pending {
                    file.sync_data()?;
                    record_progress(&state, &hash, length)?;
                }
                Ok(())
            })?;
        Ok(Self { lengths, thread })
    }

    /// Waits for the checkpoint in progress; its error, if any.
    fn stop(self) -> io::Result<()> {
        drop(self.lengths);
        self.thread
            .join()
            .map_err(|_| io::Error::other("the checkpoint thread panicked"))?
    }
}

impl PartialWriter {
    fn open(
        partial: PathBuf,
        state: PathBuf,
        hash: BlobHash,
        start: u64,
        size: u64,
    ) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(start == 0)
            .open(&partial)?;
        file.set_len(start)?;
        if size > start {
            // Reserves the blocks up front (one allocation instead of one per write); the file's
            // length still grows only with verified data. Not every file system can.
            let reserved = rustix::fs::fallocate(
                &file,
                rustix::fs::FallocateFlags::KEEP_SIZE,
                start,
                size - start,
            );
            if let Err(error) = reserved {
                debug!(%error, "fallocate of the partial download failed");
            }
        }
        let checkpoints = Checkpoints::start(file.try_clone()?, state.clone(), hash)?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(direct_io_flag())
            .open(&partial)
            .inspect_err(|error| debug!(%error, "no direct I/O for the partial download"))
            .ok();
        Ok(Self {
            file,
            direct,
            state,
            hash,
            length: start,
            checkpoint: start,
            checkpoints: Some(checkpoints),
        })
    }

    /// Fsyncs and records the verified length; returns it.
    fn finish(mut self) -> io::Result<u64> {
        let checkpoints = self.checkpoints.take().map_or(Ok(()), Checkpoints::stop);
        self.file.sync_all()?;
        record_progress(&self.state, &self.hash, self.length)?;
        checkpoints?;
        Ok(self.length)
    }
}

impl VerifiedSink for PartialWriter {
    fn write(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if offset != self.length {
            return Err(io::Error::other("non-contiguous data"));
        }
        let aligned = offset.is_multiple_of(DIRECT_ALIGN)
            && (bytes.len() as u64).is_multiple_of(DIRECT_ALIGN)
            && bytes.as_ptr().align_offset(DIRECT_ALIGN as usize) == 0;
        let written_directly = match &self.direct {
            Some(direct) if aligned => match direct.write_all_at(bytes, offset) {
                Ok(()) => true,
                // The device wants a larger alignment: buffered writes from now on.
                Err(error)
                    if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
                {
                    debug!(%error, "direct write refused, writing through the page cache");
                    self.direct = None;
                    false
                }
                Err(error) => return Err(error),
            },
            _ => false,
        };
        if !written_directly {
            self.file.write_all_at(bytes, offset)?;
        }
        self.length += bytes.len() as u64;
        if self.length - self.checkpoint >= CHECKPOINT_BYTES
            && let Some(checkpoints) = &self.checkpoints
        {
            match checkpoints.lengths.try_send(self.length) {
                Ok(()) => self.checkpoint = self.length,
                // The previous checkpoint is still being written: try again after more data.
                Err(std::sync::mpsc::TrySendError::Full(_)) => {}
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                    let failed = self.checkpoints.take().map_or(Ok(()), Checkpoints::stop);
                    failed?;
                    return Err(io::Error::other("the checkpoint thread stopped"));
                }
            }
        }
        Ok(())
    }
}

/// Downloads a whole blob into memory, retrying transient failures as `policy` says and
/// resuming from what earlier attempts delivered. Large blobs land in a mapping faulted in
/// ahead of the data ([`BlobBuffer`]), handed over as [`Bytes`] without a copy. `progress`
/// hears each attempt's start and the verified position while it grows (every
/// [`PROGRESS_INTERVAL`](horde_transport::blob::PROGRESS_INTERVAL)).
pub async fn get_to_memory(
    endpoint: &HordeEndpoint,
    storage: &NodeAddr,
    hash: BlobHash,
    max_size: u64,
    policy: &TransferPolicy,
    progress: &mut dyn Progress,
) -> Result<Bytes, TransferError> {
    let mut buffer = BlobBuffer::new();
    let mut retries = Retries::new(policy);
    let outcome = loop {
        let result = match retries.connect(endpoint, storage).await {
            Ok(connection) => {
                let timeout = policy.progress_timeout;
                get_into_buffer_reporting(
                    &connection,
                    hash,
                    max_size,
                    timeout,
                    &mut buffer,
                    progress,
                )
                .await
            }
            Err(error) => Err(error),
        };
        match result {
            Ok(_) => break Ok(buffer.into_bytes()),
            Err(error) if retries.again(&error, "download").await => {}
            Err(error) => break Err(error),
        }
    };
    progress.finish();
    outcome
}

/// One in-memory download attempt appending to `buffer` (which holds a verified prefix).
/// Returns the bytes read from the network; fails with [`BlobError::Stalled`] when the node
/// sends nothing for `progress_timeout`.
pub async fn get_into_vec(
    connection: &quinn::Connection,
    hash: BlobHash,
    max_size: u64,
    progress_timeout: Duration,
    buffer: &mut Vec<u8>,
) -> Result<u64, TransferError> {
    let stream = request_rest(connection, hash, max_size, progress_timeout, buffer.len()).await?;
    // Frames are copied once, straight into `buffer`, and verified there; on an error it keeps
    // the verified prefix for the next attempt.
    Ok(stream.read_to_vec(buffer).await?)
}

/// One in-memory download attempt appending to `buffer` (which holds a verified prefix; a
/// cleared buffer is refilled in place). A buffer without room for the blob is replaced by one
/// in a mapping for a large blob ([`BlobBuffer::with_capacity`]). Returns the bytes read from
/// the network; fails with [`BlobError::Stalled`] when the node sends nothing for
/// `progress_timeout`.
pub async fn get_into_buffer(
    connection: &quinn::Connection,
    hash: BlobHash,
    max_size: u64,
    progress_timeout: Duration,
    buffer: &mut BlobBuffer,
) -> Result<u64, TransferError> {
    get_into_buffer_reporting(
        connection,
        hash,
        max_size,
        progress_timeout,
        buffer,
        &mut NoProgress,
    )
    .await
}

/// [`get_into_buffer`], telling `progress` the attempt's start and the verified position.
async fn get_into_buffer_reporting(
    connection: &quinn::Connection,
    hash: BlobHash,
    max_size: u64,
    progress_timeout: Duration,
    buffer: &mut BlobBuffer,
    progress: &mut dyn Progress,
) -> Result<u64, TransferError> {
    let stream = request_rest(connection, hash, max_size, progress_timeout, buffer.len()).await?;
    progress.start(stream.size(), buffer.len() as u64);
    let mut update = |done| progress.update(done);
    Ok(stream
        .read_to_buffer_with_progress(buffer, &mut update)
        .await?)
}

/// Asks for the blob's bytes after the first `held` (all of them when none are held).
async fn request_rest(
    connection: &quinn::Connection,
    hash: BlobHash,
    max_size: u64,
    progress_timeout: Duration,
    held: usize,
) -> Result<GetStream, BlobError> {
    let ranges = if held > 0 {
        vec![ByteRange::from_offset(held as u64)]
    } else {
        Vec::new()
    };
    request_get(connection, hash, ranges, max_size, progress_timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_writer_checkpoints_in_the_background_and_records_the_final_length() {
        let dir = tempfile::tempdir().unwrap();
        let (partial, state) = partial_paths(&dir.path().join("out"));
        let hash = BlobHash([3; 32]);
        let chunk = vec![7u8; 1 << 20];
        let size = CHECKPOINT_BYTES + chunk.len() as u64;
        let mut writer =
            PartialWriter::open(partial.clone(), state.clone(), hash, 0, size).unwrap();
        let mut offset = 0;
        while offset < CHECKPOINT_BYTES {
            writer.write(offset, &chunk).unwrap();
            offset += chunk.len() as u64;
        }
        // The checkpoint is made durable by the helper thread, while writing goes on.
        let mut recorded = None;
        for _ in 0..1000 {
            recorded = recorded_progress(&partial, &state, &hash);
            if recorded.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(recorded, Some(CHECKPOINT_BYTES));
        assert!(writer.write(0, &chunk).is_err(), "only contiguous data");
        writer.write(offset, &chunk).unwrap();
        // The file grows with the data only, not with the reserved blocks.
        assert_eq!(fs::metadata(&partial).unwrap().len(), size);
        assert_eq!(writer.finish().unwrap(), size);
        assert_eq!(recorded_progress(&partial, &state, &hash), Some(size));
    }
}
