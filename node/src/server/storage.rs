//! The storage role: a content-addressed blob store on disk, served over `horde/blob/1`.
//!
//! - [`BlobStore`]: the files under `<data_dir>/`: `blobs/<hex>` (the blob) and
//!   `blobs/<hex>.outboard` (its verification tree), `partial/<hex>` (+ `.size`) for resumable
//!   uploads that declared their hash, `tmp/` for everything being written. A blob appears under
//!   its hash only after its bytes were hashed by the store, fsynced and renamed into place.
//! - [`PutSession`]: one upload being written (blocking I/O; run it on a blocking thread).
//! - [`serve`] / [`serve_connection`]: the server loop, one task per stream. Every stream must
//!   make progress within [`StoreLimits::progress_timeout`] (its request, each read of an upload
//!   body, each write of a download), else it is reset and stopped with [`codes::TIMED_OUT`];
//!   at most [`StoreLimits::max_transfers`] gets and puts run at once, and at most
//!   [`StoreLimits::transfers_per_peer`] of one hotkey, so one key cannot hold every slot;
//!   more are refused as busy.
//! - Space: every upload reserves its declared size (less what a resumed partial holds) before
//!   a byte is written, against `[storage] max_bytes` (stored blobs + partials + reservations)
//!   and the filesystem's free space, or is refused `StorageFull`; a write that still finds the
//!   disk full reclaims its partial; partials idle for `[storage] partial_idle_secs` are expired
//!   by a sweep. The node publishes its space in its discovery record (`storage-mib`).
//!
//! Layout: `storage.rs` (limits, the store, the server loop), `storage/put.rs` (an upload:
//! [`PutSession`] and [`BlobStore::begin_put`]), `storage/space.rs` (the space accounting).

mod put;
mod space;

pub use put::PutSession;
pub use space::{NoRoom, SpaceUsage};

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use horde_protocol::blob::{BlobErrorKind, BlobRequest, BlobResponse, BlobStatus};
use horde_protocol::{BlobHash, ClassCapacity, Hotkey, Role};
use horde_transport::blob::{
    Backing, BlobError, PROGRESS_TIMEOUT, ServedBlob, read_request, serve_get,
    within_progress_timeout, write_response,
};
use horde_transport::{
    ALPN_BLOB, ChannelError, HordeEndpoint, PeerPermit, PeerQuota, codes, remote_hotkey,
};
use quinn::VarInt;
use tokio::sync::{Semaphore, SemaphorePermit, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::server::role::{RoleHandle, Service};

use crate::server::config::InvalidField;

pub use horde_protocol::blob::DEFAULT_MAX_BLOB_SIZE;

/// Bytes accumulated before one write to disk: large writes, few syscalls.
const WRITE_BUFFER: usize = 1 << 20;

/// Largest chunk read from a QUIC stream at once on upload.
const READ_CHUNK: usize = 1 << 20;

/// Uploaded chunks queued for the disk writer: bounds memory per upload to a few MiB.
const WRITE_QUEUE: usize = 8;

/// Default cap on gets and puts served at once: 64. Each holds up to ~9 MiB of buffers (an
/// upload's write queue, a download's two read batches), so 64 bound them near 600 MiB; each
/// upload also holds a blocking thread for its disk writer, and 64 stay far below tokio's 512,
/// so stalled or slow transfers never starve the disk work of the others. 64 transfers at once
/// already share a 10 Gbit/s link at under 20 MB/s each.
pub const DEFAULT_MAX_TRANSFERS: usize = 64;

/// Default cap on gets and puts served at once for one hotkey: 16, a quarter of
/// [`DEFAULT_MAX_TRANSFERS`], so one key (say, one holding gets it never reads, renewed within
/// the progress timeout) leaves three quarters of the slots to the others. An executor or a
/// client moves one blob at a time, so 16 is far above what an honest key needs.
pub const DEFAULT_MAX_TRANSFERS_PER_PEER: usize = 16;

/// Default idle time after which a partial upload nobody continues is removed: one hour, long
/// enough for a client to come back after a dropped link or a restart (its retries span
/// minutes), short enough that abandoned uploads do not hold the disk for long.
pub const DEFAULT_PARTIAL_IDLE: Duration = Duration::from_secs(3600);

/// Longest pause between two sweeps for idle partial uploads: a minute (a quarter of the idle
/// time when that is shorter), so a partial outlives its idle time by at most that.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Who may upload, how much, and how the store bounds the streams it serves: the node config's
/// `[storage]` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreLimits {
    /// Largest blob accepted.
    pub max_blob_size: u64,
    /// Hotkeys allowed to put; `None`: any authenticated key (the testnet default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub put_allowlist: Option<Vec<Hotkey>>,
    /// How long a stream may make no progress (no byte of its request or upload received, no
    /// byte of a download taken by the peer) before it is reset with [`codes::TIMED_OUT`].
    #[serde(rename = "progress_timeout_ms", with = "crate::server::config::millis")]
    pub progress_timeout: Duration,
    /// Gets and puts served at once; more are refused with `Busy` (clients retry).
    pub max_transfers: usize,
    /// Gets and puts served at once for one hotkey; more from that key are refused with `Busy`
    /// while other keys are still served. `None`: [`DEFAULT_MAX_TRANSFERS_PER_PEER`], or
    /// `max_transfers` if that is lower (see [`StoreLimits::transfers_per_peer`]), so a file that
    /// lowers only `max_transfers` stays valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_transfers_per_peer: Option<usize>,
    /// Most bytes the store holds on disk: stored blobs (with their outboards), partial uploads
    /// and the room reserved by uploads in flight. A put that would go past it is refused
    /// `StorageFull` before a byte is written. `None`: only the filesystem's free space bounds
    /// it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// How long a partial upload may sit untouched (no upload continuing it) before it is
    /// removed.
    #[serde(rename = "partial_idle_secs", with = "crate::server::config::secs")]
    pub partial_idle: Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_blob_size: DEFAULT_MAX_BLOB_SIZE,
            put_allowlist: None,
            progress_timeout: PROGRESS_TIMEOUT,
            max_transfers: DEFAULT_MAX_TRANSFERS,
            max_transfers_per_peer: None,
            max_bytes: None,
            partial_idle: DEFAULT_PARTIAL_IDLE,
        }
    }
}

impl StoreLimits {
    /// Gets and puts served at once for one hotkey: `max_transfers_per_peer`, or by default
    /// [`DEFAULT_MAX_TRANSFERS_PER_PEER`] but no more than `max_transfers`.
    pub fn transfers_per_peer(&self) -> usize {
        self.max_transfers_per_peer
            .unwrap_or(DEFAULT_MAX_TRANSFERS_PER_PEER.min(self.max_transfers))
    }

    /// Checks `[storage]`.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let protocol_max = horde_protocol::blob::MAX_PROTOCOL_BLOB_SIZE;
        if self.max_blob_size == 0 || self.max_blob_size > protocol_max {
            return Err(InvalidField::new(
                "storage.max_blob_size",
                format!("must be between 1 and {protocol_max} bytes"),
            ));
        }
        if self.progress_timeout.is_zero() {
            return Err(InvalidField::new(
                "storage.progress_timeout_ms",
                "must be above 0",
            ));
        }
        if self.max_transfers == 0 {
            return Err(InvalidField::new(
                "storage.max_transfers",
                "must be above 0",
            ));
        }
        if self.max_bytes == Some(0) {
            return Err(InvalidField::new("storage.max_bytes", "must be above 0"));
        }
        if self.partial_idle.is_zero() {
            return Err(InvalidField::new(
                "storage.partial_idle_secs",
                "must be above 0",
            ));
        }
        let per_peer = self.transfers_per_peer();
        if per_peer == 0 || per_peer > self.max_transfers {
            return Err(InvalidField::new(
                "storage.max_transfers_per_peer",
                format!(
                    "must be between 1 and max_transfers ({})",
                    self.max_transfers
                ),
            ));
        }
        Ok(())
    }
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobStoreError {
    /// The blob is over the size limit.
    #[error("blob of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The bytes do not hash to the declared hash.
    #[error("uploaded bytes hash to {actual}, not the declared {declared}")]
    HashMismatch {
        /// Declared.
        declared: BlobHash,
        /// Computed.
        actual: BlobHash,
    },
    /// Fewer or more bytes than announced.
    #[error("received {received} bytes, {size} announced")]
    WrongLength {
        /// Received.
        received: u64,
        /// Announced.
        size: u64,
    },
    /// Another upload of this hash is running.
    #[error("an upload of {0} is already in progress")]
    Busy(BlobHash),
    /// The upload does not fit: refused before a byte was written.
    #[error("no room: {0}")]
    NoRoom(#[from] NoRoom),
    /// Disk I/O failed.
    #[error("store I/O: {0}")]
    Io(#[from] io::Error),
}

impl BlobStoreError {
    fn kind(&self) -> BlobErrorKind {
        match self {
            Self::TooLarge { .. } => BlobErrorKind::TooLarge,
            Self::HashMismatch { .. } => BlobErrorKind::HashMismatch,
            Self::WrongLength { .. } => BlobErrorKind::BadRequest,
            Self::Busy(_) => BlobErrorKind::Busy,
            Self::NoRoom(_) => BlobErrorKind::StorageFull,
            Self::Io(error) if is_out_of_room(error) => BlobErrorKind::StorageFull,
            Self::Io(_) => BlobErrorKind::Internal,
        }
    }

    /// The code the upload stream is stopped with: the peer's fault only when its bytes were.
    fn stop_code(&self) -> VarInt {
        match self.kind() {
            BlobErrorKind::TooLarge => codes::NOT_ALLOWED,
            BlobErrorKind::HashMismatch | BlobErrorKind::BadRequest => codes::PROTOCOL_VIOLATION,
            BlobErrorKind::Busy => codes::BUSY,
            BlobErrorKind::StorageFull => codes::STORAGE_FULL,
            _ => codes::INTERNAL,
        }
    }
}

/// Whether a write failed for want of room: disk full, quota, or the file size limit.
fn is_out_of_room(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    )
}

/// The content-addressed store. Cheap to share behind an `Arc`; the only shared mutable state is
/// the set of hashes being uploaded (so two uploads never write one partial file).
#[derive(Debug)]
pub struct BlobStore {
    blobs: PathBuf,
    partial: PathBuf,
    tmp: PathBuf,
    limits: StoreLimits,
    uploads: Mutex<HashSet<BlobHash>>,
    /// One permit per get or put being served ([`StoreLimits::max_transfers`]).
    transfers: Semaphore,
    /// What each peer holds of them ([`StoreLimits::max_transfers_per_peer`]).
    transfers_per_peer: Arc<PeerQuota>,
    /// What is held and reserved on disk.
    space: space::Space,
}

/// A get or put being served: one of the store's transfer slots and one of its peer's share,
/// both given back when it is dropped, however the transfer ends.
#[derive(Debug)]
struct TransferSlot<'a> {
    _slot: SemaphorePermit<'a>,
    _share: PeerPermit,
}

/// Why a get or put found no transfer slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransfersBusy {
    /// [`StoreLimits::max_transfers`] are running.
    Store,
    /// The peer runs [`StoreLimits::max_transfers_per_peer`] already.
    Peer,
}

impl BlobStore {
    /// Opens (creating if needed) the store under `data_dir` and empties its `tmp/`.
    pub fn open(data_dir: &Path, limits: StoreLimits) -> io::Result<Self> {
        let blobs = data_dir.join("blobs");
        let partial = data_dir.join("partial");
        let tmp = data_dir.join("tmp");
        for dir in [&blobs, &partial, &tmp] {
            fs::create_dir_all(dir)?;
        }
        for entry in fs::read_dir(&tmp)? {
            let _ = fs::remove_file(entry?.path());
        }
        let space = space::Space::scan(data_dir, &[&blobs, &partial], limits.max_bytes)?;
        let usage = space.usage();
        info!(
            held = usage.held,
            max_bytes = ?usage.cap,
            fs_available = usage.fs_available,
            partial_idle_secs = limits.partial_idle.as_secs(),
            "blob store opened",
        );
        let transfers = Semaphore::new(limits.max_transfers.min(Semaphore::MAX_PERMITS));
        let transfers_per_peer = Arc::new(PeerQuota::new(limits.transfers_per_peer()));
        Ok(Self {
            blobs,
            partial,
            tmp,
            limits,
            uploads: Mutex::new(HashSet::new()),
            transfers,
            transfers_per_peer,
            space,
        })
    }

    /// What the store holds and may still take now.
    pub fn usage(&self) -> SpaceUsage {
        self.space.usage()
    }

    /// The capacity entry the node publishes in its discovery record
    /// ([`horde_protocol::STORAGE_CAPACITY_CLASS`]), updated as the store fills and empties.
    pub fn capacity_updates(&self) -> watch::Receiver<Vec<ClassCapacity>> {
        self.space.capacity_updates()
    }

    /// Removes the partial uploads nobody has continued for [`StoreLimits::partial_idle`]
    /// (their files untouched that long, no upload of theirs running); returns the bytes
    /// freed. Blocking.
    pub fn expire_idle_partials(&self) -> io::Result<u64> {
        let now = SystemTime::now();
        let mut freed = 0;
        for entry in fs::read_dir(&self.partial)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let (name, is_size) = match name.strip_suffix(".size") {
                Some(stem) => (stem, true),
                None => (name, false),
            };
            let Ok(hash) = name.parse::<BlobHash>() else {
                continue;
            };
            // A partial's age is its data file's; a `.size` alone is an orphan.
            if is_size && self.partial_path(&hash).exists() {
                continue;
            }
            let idle = entry
                .metadata()
                .and_then(|meta| meta.modified())
                .ok()
                .and_then(|modified| now.duration_since(modified).ok())
                .unwrap_or_default();
            if idle < self.limits.partial_idle {
                continue;
            }
            // Under the upload lock, so no upload of it starts while it goes.
            let uploads = self.uploads.lock().unwrap_or_else(PoisonError::into_inner);
            if uploads.contains(&hash) || !entry.path().exists() {
                continue;
            }
            let bytes = self.remove_partial(&hash);
            drop(uploads);
            self.space.forget(bytes);
            freed += bytes;
            info!(hash = %hash.fmt_short(), bytes, idle_secs = idle.as_secs(), "idle partial upload expired");
        }
        Ok(freed)
    }

    /// A slot to serve one get or put for `peer`, unless the peer holds its share already or
    /// [`StoreLimits::max_transfers`] are running.
    fn transfer_slot(&self, peer: Hotkey) -> Result<TransferSlot<'_>, TransfersBusy> {
        let share = self
            .transfers_per_peer
            .try_acquire(peer)
            .ok_or(TransfersBusy::Peer)?;
        let slot = self
            .transfers
            .try_acquire()
            .map_err(|_| TransfersBusy::Store)?;
        Ok(TransferSlot {
            _slot: slot,
            _share: share,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// Whether `hotkey` may put blobs.
    pub fn may_put(&self, hotkey: &Hotkey) -> bool {
        self.limits
            .put_allowlist
            .as_ref()
            .is_none_or(|allowed| allowed.contains(hotkey))
    }

    /// Path of a stored blob (which may not exist).
    pub fn blob_path(&self, hash: &BlobHash) -> PathBuf {
        self.blobs.join(hash.to_string())
    }

    fn outboard_path(&self, hash: &BlobHash) -> PathBuf {
        self.blobs.join(format!("{hash}.outboard"))
    }

    fn partial_path(&self, hash: &BlobHash) -> PathBuf {
        self.partial.join(hash.to_string())
    }

    fn partial_size_path(&self, hash: &BlobHash) -> PathBuf {
        self.partial.join(format!("{hash}.size"))
    }

    /// What the store holds for `hash`.
    pub fn stat(&self, hash: &BlobHash) -> io::Result<BlobStatus> {
        match fs::metadata(self.blob_path(hash)) {
            Ok(meta) => return Ok(BlobStatus::Complete { size: meta.len() }),
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            Err(_) => {}
        }
        match (
            fs::metadata(self.partial_path(hash)),
            fs::read_to_string(self.partial_size_path(hash)),
        ) {
            (Ok(meta), Ok(size)) => match size.trim().parse() {
                Ok(size) => Ok(BlobStatus::Partial {
                    received: meta.len(),
                    size,
                }),
                Err(_) => Ok(BlobStatus::Absent),
            },
            _ => Ok(BlobStatus::Absent),
        }
    }

    /// Opens a stored blob for serving, `None` if absent.
    pub fn open_blob(&self, hash: &BlobHash) -> io::Result<Option<ServedBlob>> {
        let data = match File::open(self.blob_path(hash)) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        let outboard = File::open(self.outboard_path(hash))?;
        let size = data.metadata()?.len();
        if outboard.metadata()?.len() != horde_protocol::blob::outboard_len(size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("outboard of {hash} has the wrong length"),
            ));
        }
        Ok(Some(ServedBlob {
            size,
            data: Backing::File(Arc::new(data)),
            outboard: Backing::File(Arc::new(outboard)),
        }))
    }

    fn release(&self, hash: &BlobHash) {
        self.uploads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(hash);
    }

    /// Stores `bytes` (blocking); returns the hash. For tests, benches and local imports.
    pub fn insert(self: &Arc<Self>, bytes: &[u8]) -> Result<BlobHash, BlobStoreError> {
        let mut session = self.begin_put(bytes.len() as u64, None, false)?;
        session.write(bytes)?;
        session.finish()
    }
}

/// Starts the storage role on `store`: it serves the node's `horde/blob/1` connections until
/// `cancel`.
pub(crate) fn start(store: Arc<BlobStore>, cancel: CancellationToken) -> RoleHandle {
    let mut handle = RoleHandle::new(Role::Storage, Service::Storage(Arc::clone(&store)), cancel);
    let token = handle.cancel().clone();
    handle.spawn(sweep_idle_partials(store, token));
    handle
}

/// Expires idle partial uploads ([`BlobStore::expire_idle_partials`]) every quarter of
/// [`StoreLimits::partial_idle`], at most [`MAX_SWEEP_INTERVAL`] apart, until `cancel`.
pub async fn sweep_idle_partials(store: Arc<BlobStore>, cancel: CancellationToken) {
    let interval = (store.limits.partial_idle / 4).min(MAX_SWEEP_INTERVAL);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let sweeping = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || sweeping.expire_idle_partials()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => warn!(%error, "sweeping idle partial uploads failed"),
            Err(error) => warn!(%error, "the idle partial sweep panicked"),
        }
    }
}

/// Accepts `horde/blob/1` connections on `endpoint` and serves them until `cancel` fires, through
/// the one accept loop every node runs ([`HordeEndpoint::serve`]); connections on other ALPNs are
/// closed with [`codes::NOT_ALLOWED`]. For a store embedded without a node (tests, benches).
pub async fn serve(endpoint: Arc<HordeEndpoint>, store: Arc<BlobStore>, cancel: CancellationToken) {
    tokio::spawn(sweep_idle_partials(Arc::clone(&store), cancel.clone()));
    endpoint
        .serve(&cancel, move |incoming, token| {
            let store = Arc::clone(&store);
            async move {
                if incoming.alpn != ALPN_BLOB {
                    incoming
                        .connection
                        .close(codes::NOT_ALLOWED, b"only horde/blob/1 here");
                    return;
                }
                serve_connection(incoming.connection, store, token).await;
            }
        })
        .await;
    endpoint.close(codes::SHUTDOWN, b"storage shutting down");
}

/// Serves the streams of one authenticated `horde/blob/1` connection until it closes or
/// `cancel` fires. Each stream carries one request.
pub async fn serve_connection(
    connection: quinn::Connection,
    store: Arc<BlobStore>,
    cancel: CancellationToken,
) {
    let peer = match remote_hotkey(&connection) {
        Ok(peer) => peer,
        Err(error) => {
            warn!(%error, "blob connection without a readable identity");
            connection.close(codes::PROTOCOL_VIOLATION, b"no identity");
            return;
        }
    };
    let mut streams = JoinSet::new();
    loop {
        let stream = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                connection.close(codes::SHUTDOWN, b"storage shutting down");
                break;
            }
            stream = connection.accept_bi() => stream,
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
        };
        let (send, recv) = match stream {
            Ok(stream) => stream,
            Err(error) => {
                debug!(%error, "blob connection ended");
                break;
            }
        };
        streams.spawn(serve_stream(send, recv, peer, Arc::clone(&store)));
    }
    streams.shutdown().await;
}

/// Serves one stream; a stream that stalled is reset and stopped with [`codes::TIMED_OUT`].
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: Hotkey,
    store: Arc<BlobStore>,
) {
    match handle_stream(&mut send, &mut recv, peer, &store).await {
        Ok(()) => {}
        Err(error @ BlobError::Stalled { .. }) => {
            let _ = send.reset(codes::TIMED_OUT);
            let _ = recv.stop(codes::TIMED_OUT);
            info!(peer = %peer.fmt_short(), %error, "blob stream stalled; reset");
        }
        Err(error) => debug!(%error, peer = %peer.fmt_short(), "blob stream failed"),
    }
}

/// Stops the request side with `stop` and answers with a typed error.
async fn refuse(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    store: &BlobStore,
    kind: BlobErrorKind,
    message: String,
    stop: VarInt,
) -> Result<(), BlobError> {
    let _ = recv.stop(stop);
    let response = BlobResponse::Error { kind, message };
    respond(send, store, &response).await?;
    let _ = send.finish();
    Ok(())
}

/// Writes one response frame within the progress timeout.
async fn respond(
    send: &mut quinn::SendStream,
    store: &BlobStore,
    response: &BlobResponse,
) -> Result<(), BlobError> {
    within_progress_timeout(
        store.limits.progress_timeout,
        write_response(send, response),
    )
    .await
}

/// Refuses a get or put because [`StoreLimits::max_transfers`] are running, or
/// [`StoreLimits::max_transfers_per_peer`] for this peer.
async fn refuse_busy(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    peer: Hotkey,
    store: &BlobStore,
    busy: TransfersBusy,
) -> Result<(), BlobError> {
    let message = match busy {
        TransfersBusy::Store => {
            let max = store.limits.max_transfers;
            info!(peer = %peer.fmt_short(), max, "all transfer slots busy; refusing");
            format!("serving {max} transfers already; try again later")
        }
        TransfersBusy::Peer => {
            let max = store.limits.transfers_per_peer();
            info!(peer = %peer.fmt_short(), max, "the peer holds its share of transfer slots; refusing");
            format!("serving {max} transfers for {peer} already; try again later")
        }
    };
    refuse(send, recv, store, BlobErrorKind::Busy, message, codes::BUSY).await
}

async fn handle_stream(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    peer: Hotkey,
    store: &Arc<BlobStore>,
) -> Result<(), BlobError> {
    let progress_timeout = store.limits.progress_timeout;
    let request = match within_progress_timeout(progress_timeout, read_request(recv)).await {
        Ok(Some(request)) => request,
        Ok(None) => return Ok(()),
        Err(BlobError::Channel(ChannelError::Frame(error))) => {
            let stop = match error {
                horde_protocol::FrameError::TooLarge { .. } => codes::FRAME_TOO_LARGE,
                _ => codes::PROTOCOL_VIOLATION,
            };
            warn!(peer = %peer.fmt_short(), %error, "bad blob request");
            let message = format!("bad request: {error}");
            let kind = BlobErrorKind::BadRequest;
            return refuse(send, recv, store, kind, message, stop).await;
        }
        Err(error) => return Err(error),
    };
    // Gets and puts hold a transfer slot (the store's and the peer's share) until they end.
    let _slot = match &request {
        BlobRequest::Get { .. } | BlobRequest::Put { .. } => match store.transfer_slot(peer) {
            Ok(slot) => Some(slot),
            Err(busy) => return refuse_busy(send, recv, peer, store, busy).await,
        },
        _ => None,
    };
    match request {
        BlobRequest::Stat { hash } => {
            let status = store.stat(&hash)?;
            respond(send, store, &BlobResponse::Status(status)).await?;
            let _ = send.finish();
        }
        BlobRequest::Get { hash, ranges } => {
            let blob = {
                let store = Arc::clone(store);
                tokio::task::spawn_blocking(move || store.open_blob(&hash))
                    .await
                    .map_err(io::Error::other)?
            };
            match blob {
                Ok(Some(blob)) => {
                    let sent = serve_get(send, &blob, &ranges, progress_timeout).await?;
                    debug!(hash = %hash.fmt_short(), sent, "served blob");
                }
                Ok(None) => {
                    respond(send, store, &BlobResponse::NotFound).await?;
                    let _ = send.finish();
                }
                Err(error) => {
                    warn!(hash = %hash.fmt_short(), %error, "cannot open blob");
                    let message = "cannot read the blob".to_owned();
                    let kind = BlobErrorKind::Internal;
                    return refuse(send, recv, store, kind, message, codes::INTERNAL).await;
                }
            }
        }
        BlobRequest::Put { size, hash, resume } => {
            handle_put(send, recv, peer, store, size, hash, resume).await?;
        }
    }
    Ok(())
}

enum WriterMessage {
    Data(Bytes),
    Finish,
}

async fn handle_put(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    peer: Hotkey,
    store: &Arc<BlobStore>,
    size: u64,
    hash: Option<BlobHash>,
    resume: bool,
) -> Result<(), BlobError> {
    if !store.may_put(&peer) {
        let message = format!("{peer} may not put blobs here");
        let kind = BlobErrorKind::NotAllowed;
        return refuse(send, recv, store, kind, message, codes::NOT_ALLOWED).await;
    }
    let session = {
        let store = Arc::clone(store);
        tokio::task::spawn_blocking(move || store.begin_put(size, hash, resume))
            .await
            .map_err(io::Error::other)?
    };
    let session = match session {
        Ok(session) => session,
        Err(error) => {
            warn!(peer = %peer.fmt_short(), %error, "upload refused");
            let (kind, stop) = (error.kind(), error.stop_code());
            return refuse(send, recv, store, kind, error.to_string(), stop).await;
        }
    };
    let offset = session.offset();
    respond(send, store, &BlobResponse::PutReady { offset }).await?;

    let (queue, mut inbox) = mpsc::channel::<WriterMessage>(WRITE_QUEUE);
    let writer = tokio::task::spawn_blocking(move || {
        let mut session = session;
        while let Some(message) = inbox.blocking_recv() {
            match message {
                WriterMessage::Data(bytes) => session.write(&bytes)?,
                WriterMessage::Finish => return session.finish().map(Some),
            }
        }
        Ok(None)
    });
    let mut received = offset;
    let mut failure = None;
    let progress_timeout = store.limits.progress_timeout;
    loop {
        let read = within_progress_timeout(progress_timeout, recv.read_chunk(READ_CHUNK, true));
        let read = tokio::select! {
            biased;
            // The writer stopped on a disk error: answer now, not when the peer sends more.
            () = queue.closed() => break,
            read = read => read,
        };
        match read {
            Ok(Some(chunk)) => {
                received += chunk.bytes.len() as u64;
                if received > size || queue.send(WriterMessage::Data(chunk.bytes)).await.is_err() {
                    break;
                }
            }
            Ok(None) => {
                let _ = queue.send(WriterMessage::Finish).await;
                break;
            }
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    // The writer sees the queue end, writes what it holds and stops (keeping a declared-hash
    // partial for a resume).
    drop(queue);
    let outcome = writer.await.map_err(io::Error::other)?;
    if let Some(error) = failure {
        info!(peer = %peer.fmt_short(), received, size, "upload interrupted, partial kept");
        return Err(error);
    }
    match outcome {
        Ok(Some(hash)) => {
            info!(hash = %hash.fmt_short(), size, "stored blob");
            respond(send, store, &BlobResponse::Stored { hash, size }).await?;
            let _ = send.finish();
            Ok(())
        }
        Ok(None) => {
            let message = format!("received more than the announced {size} bytes");
            let kind = BlobErrorKind::BadRequest;
            refuse(send, recv, store, kind, message, codes::PROTOCOL_VIOLATION).await
        }
        Err(error) => {
            warn!(peer = %peer.fmt_short(), %error, "upload refused");
            let (kind, stop) = (error.kind(), error.stop_code());
            refuse(send, recv, store, kind, error.to_string(), stop).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use horde_transport::test_utils::seeded_key;

    #[test]
    fn transfer_slots_are_shared_fairly_and_all_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let limits = StoreLimits {
            max_transfers: 3,
            max_transfers_per_peer: Some(2),
            ..StoreLimits::default()
        };
        let store = BlobStore::open(dir.path(), limits).unwrap();
        let (a, b, c) = (
            seeded_key(1).hotkey(),
            seeded_key(2).hotkey(),
            seeded_key(3).hotkey(),
        );
        let a1 = store.transfer_slot(a).unwrap();
        let a2 = store.transfer_slot(a).unwrap();
        assert_eq!(store.transfer_slot(a).unwrap_err(), TransfersBusy::Peer);
        let b1 = store
            .transfer_slot(b)
            .expect("another key still gets a slot");
        // Every slot is taken: a third key under its share is refused for the store's cap,
        // and the refusal leaves no share held.
        assert_eq!(store.transfer_slot(c).unwrap_err(), TransfersBusy::Store);
        assert_eq!(store.transfers_per_peer.held_by(&c), 0);
        assert_eq!(store.transfers_per_peer.peers(), 2);

        drop(a1);
        let c1 = store
            .transfer_slot(c)
            .expect("a freed slot serves the next key");
        drop((a2, b1, c1));
        assert_eq!(store.transfers.available_permits(), 3);
        assert_eq!(
            store.transfers_per_peer.peers(),
            0,
            "peers with no transfer leave the table"
        );
    }
}
