//! Volume materialization and output uploads for the executor.
//!
//! - [`validate_relative_path`] / [`validate_paths`]: the receiving side's checks on file names
//!   sent by a client ([`PathError`] names each refusal).
//! - [`materialize`]: fetches every [`VolumeSpec`] into `<job_dir>/volume/<path>`: `Blob` from a
//!   storage node (verified, resumable), `Url` over HTTP(S) (Range resume, bounded retries with
//!   exponential backoff, optional size and BLAKE3 checks), `Inline`. Every file is fetched into
//!   `<job_dir>/.staging/` (outside the job's view), checked, then renamed into place; no
//!   directory on the way is a symlink and the final name must not exist. URL and inline volumes
//!   are not fsynced (see [`materialize`]).
//! - [`upload`] (`volumes/upload.rs`): sends outputs from `<job_dir>/output/<path>` to a storage
//!   node or an HTTP PUT URL (presigned S3 URLs work: a plain PUT with the given headers and a
//!   Content-Length), within the class's output limit.
//! - [`HttpClient`]: the blocking HTTP agent (ureq, rustls) and its retry policy; calls run on
//!   tokio's blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use horde_protocol::{BlobHash, RelativePath, VolumeSource, VolumeSpec};
use horde_transport::HordeEndpoint;
use rustix::fs::{Mode, OFlags, RenameFlags};
use tracing::{debug, info};

use crate::client::blob::{self, TransferError};
use crate::client::progress::NoProgress;

pub use horde_protocol::spec_check::{MAX_COMPONENT_LEN, MAX_PATH_LEN, PathError};

/// Directory under the job directory that volumes land in.
pub const VOLUME_DIR: &str = "volume";

/// Directory under the job directory that outputs are read from.
pub const OUTPUT_DIR: &str = "output";

mod upload;

pub use upload::{OutputBudget, unchanged_since, upload};
#[cfg(test)]
use upload::{open_output, opened_path};

/// Private directory under the job directory where downloads are staged.
const STAGING_DIR: &str = ".staging";

/// Largest blob a volume may be when the spec does not say (matches the store's default).
const DEFAULT_MAX_VOLUME_SIZE: u64 = horde_protocol::blob::DEFAULT_MAX_BLOB_SIZE;

/// Checks a relative path sent by a peer ([`RelativePath::components`], the rules the client
/// and facilitator also apply) and returns it as a [`PathBuf`] of normal components.
pub fn validate_relative_path(path: &RelativePath) -> Result<PathBuf, PathError> {
    Ok(path.components()?.into_iter().collect())
}

/// [`validate_paths`], a refusal as the [`VolumeError`] that names the path.
fn checked_paths<'a>(
    paths: impl IntoIterator<Item = &'a RelativePath>,
) -> Result<Vec<PathBuf>, VolumeError> {
    validate_paths(paths).map_err(|(path, source)| VolumeError::Path {
        path: path.0,
        source,
    })
}

/// Validates every path of a job and refuses duplicates and a file that is another's parent
/// ([`horde_protocol::spec_check::check_paths`]).
pub fn validate_paths<'a>(
    paths: impl IntoIterator<Item = &'a RelativePath>,
) -> Result<Vec<PathBuf>, (RelativePath, PathError)> {
    match horde_protocol::spec_check::check_paths(paths) {
        Ok(all) => Ok(all
            .into_iter()
            .map(|components| components.into_iter().collect())
            .collect()),
        Err((path, error)) => Err((path.clone(), error)),
    }
}

/// Creates (or checks) the directories of `relative` under `root`, refusing any that is a
/// symlink or not a directory, and checks the final name is free. Returns the final path.
pub fn prepare_target(root: &Path, relative: &Path) -> Result<PathBuf, VolumeError> {
    let shown = relative.display().to_string();
    let mut current = root.to_owned();
    let components: Vec<_> = relative.components().collect();
    let io_error = |source| VolumeError::Io {
        path: shown.clone(),
        source,
    };
    for (index, component) in components.iter().enumerate() {
        current.push(component);
        let last = index + 1 == components.len();
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(path_error(
                    &shown,
                    PathError::Symlink(display(root, &current)),
                ));
            }
            Ok(_) if last => {
                return Err(path_error(&shown, PathError::Exists(shown.clone())));
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(path_error(
                    &shown,
                    PathError::NotADirectory(display(root, &current)),
                ));
            }
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                if !last {
                    // `create_dir` fails if anything (a symlink included) appeared meanwhile.
                    fs::create_dir(&current).map_err(io_error)?;
                }
            }
            Err(error) => return Err(io_error(error)),
        }
    }
    Ok(current)
}

/// Opens directory `name` under `dir` without following a symlink (`O_NOFOLLOW | O_DIRECTORY`).
fn open_dir_at(dir: impl AsFd, name: &Path) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The directories of `relative` under `root` (all its components but the last), walked from
/// `root`'s handle: each opened from its parent's handle with `O_NOFOLLOW` (created first if
/// missing and `create`), so a symlink anywhere below `root` or at `root` itself is refused, never
/// followed, whenever it appeared. Returns the last directory's handle, the file name, and the
/// path to it (for messages).
fn walk_to_parent<'a>(
    root: &Path,
    relative: &'a Path,
    create: bool,
    shown: &str,
) -> Result<(OwnedFd, &'a Path, PathBuf), VolumeError> {
    let components: Vec<&Path> = relative
        .components()
        .map(|component| Path::new(component.as_os_str()))
        .collect();
    let Some((file_name, dirs)) = components.split_last() else {
        return Err(path_error(shown, PathError::Empty));
    };
    let mut current = root.to_owned();
    let mut dir = open_dir_at(rustix::fs::CWD, root)
        .map_err(|errno| refuse_walk(errno, root, root, shown))?;
    for name in dirs {
        current.push(name);
        let next = match open_dir_at(&dir, name) {
            Err(rustix::io::Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&dir, *name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(errno) => return Err(errno_error(shown, errno)),
                }
                open_dir_at(&dir, name)
            }
            other => other,
        };
        dir = next.map_err(|errno| refuse_walk(errno, root, &current, shown))?;
    }
    current.push(file_name);
    Ok((dir, file_name, current))
}

/// The error for `errno` from opening `at` (under `root`) without following symlinks: with
/// `O_DIRECTORY` Linux reports a symlink as `ENOTDIR`, without it as `ELOOP`; what is there is
/// looked at, without following it, to name the refusal.
fn refuse_walk(errno: rustix::io::Errno, root: &Path, at: &Path, shown: &str) -> VolumeError {
    match errno {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
            let symlink = fs::symlink_metadata(at).is_ok_and(|meta| meta.file_type().is_symlink());
            let shown_at = display(root, at);
            if symlink || errno == rustix::io::Errno::LOOP {
                path_error(shown, PathError::Symlink(shown_at))
            } else {
                path_error(shown, PathError::NotADirectory(shown_at))
            }
        }
        errno => errno_error(shown, errno),
    }
}

fn errno_error(shown: &str, errno: rustix::io::Errno) -> VolumeError {
    VolumeError::Io {
        path: shown.to_owned(),
        source: errno.into(),
    }
}

/// Moves the checked file `staged` (in the `staging` directory) to `relative` under `root`.
/// The directories on the way are walked with [`walk_to_parent`] (created if missing), and the
/// file is renamed in relative to the last handle with `RENAME_NOREPLACE`: a symlink anywhere
/// below `root` (or at `root` itself) is refused, never followed, even if it appeared after
/// [`prepare_target`] looked, and an existing name is never replaced.
fn place_file(
    staging: &Path,
    staged: &Path,
    root: &Path,
    relative: &Path,
) -> Result<PathBuf, VolumeError> {
    let shown = relative.display().to_string();
    let (dir, file_name, current) = walk_to_parent(root, relative, true, &shown)?;
    let staging_dir = open_dir_at(rustix::fs::CWD, staging)
        .map_err(|errno| refuse_walk(errno, staging, staging, &shown))?;
    let staged_name = staged.file_name().map(Path::new).unwrap_or(staged);
    rustix::fs::renameat_with(
        &staging_dir,
        staged_name,
        &dir,
        file_name,
        RenameFlags::NOREPLACE,
    )
    .map_err(|errno| match errno {
        rustix::io::Errno::EXIST => path_error(&shown, PathError::Exists(shown.clone())),
        errno => errno_error(&shown, errno),
    })?;
    Ok(current)
}

fn display(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn path_error(path: &str, source: PathError) -> VolumeError {
    VolumeError::Path {
        path: path.to_owned(),
        source,
    }
}

/// Fetching or uploading a volume failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// The path was refused.
    #[error("volume path `{path}`: {source}")]
    Path {
        /// The path as sent.
        path: String,
        /// Why.
        source: PathError,
    },
    /// A blob transfer failed.
    #[error("volume `{path}`: {source}")]
    Blob {
        /// The path.
        path: String,
        /// The client error.
        source: TransferError,
    },
    /// The HTTP server answered with an error status.
    #[error("{url}: HTTP status {status}")]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// The HTTP transfer kept failing after every retry.
    #[error("{url}: {message} (after {attempts} attempts)")]
    Http {
        /// The URL.
        url: String,
        /// The last failure.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The content's size differs from the spec.
    #[error("`{path}`: {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The path.
        path: String,
        /// Expected.
        expected: u64,
        /// Received.
        actual: u64,
    },
    /// The content's BLAKE3 differs from the spec.
    #[error("`{path}`: BLAKE3 {actual}, expected {expected}")]
    HashMismatch {
        /// The path.
        path: String,
        /// Expected.
        expected: BlobHash,
        /// Computed.
        actual: BlobHash,
    },
    /// An output past what the job may still upload ([`OutputBudget`]).
    #[error(
        "output `{path}`: {size} bytes do not fit: the outputs of one job may total {max} bytes \
         (the class's output_mb), {left} are left"
    )]
    OverBudget {
        /// The path.
        path: String,
        /// The output's size.
        size: u64,
        /// The job's whole budget.
        max: u64,
        /// What was left of it.
        left: u64,
    },
    /// The output to upload is missing or not a regular file.
    #[error("output `{path}`: {message}")]
    Output {
        /// The path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A source or target kind this node does not handle.
    #[error("volume `{0}`: unsupported source or target")]
    Unsupported(String),
    /// Local I/O failed.
    #[error("`{path}`: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: io::Error,
    },
}

impl VolumeError {
    /// The blob transfer of the volume or output at `path` failed (for `map_err`).
    fn blob(path: &str) -> impl FnOnce(TransferError) -> Self + '_ {
        move |source| Self::Blob {
            path: path.to_owned(),
            source,
        }
    }
}

/// The blocking HTTP client and its retry policy.
#[derive(Debug, Clone)]
pub struct HttpClient {
    agent: ureq::Agent,
    max_attempts: u32,
    initial_backoff: Duration,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new(5, Duration::from_millis(500))
    }
}

impl HttpClient {
    /// A client making at most `max_attempts` per transfer, waiting `initial_backoff` (then
    /// doubling) between them. Status codes are handled here, not as transport errors; connects
    /// time out after 10 s and a body stalled for 60 s fails the attempt.
    pub fn new(max_attempts: u32, initial_backoff: Duration) -> Self {
        Self::with_tls(
            max_attempts,
            initial_backoff,
            ureq::tls::TlsConfig::default(),
        )
    }

    /// [`new`](Self::new), trusting for HTTPS only the certificates in `pem` instead of the
    /// web's public roots: servers under a private CA (or a benchmark's own). An error if `pem`
    /// holds no certificate or one that does not parse.
    pub fn with_roots_pem(
        max_attempts: u32,
        initial_backoff: Duration,
        pem: &[u8],
    ) -> io::Result<Self> {
        let roots = ureq::tls::parse_pem(pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(certificate)) => Some(Ok(certificate)),
                Ok(_) => None,
                Err(error) => Some(Err(io::Error::new(io::ErrorKind::InvalidData, error))),
            })
            .collect::<io::Result<Vec<_>>>()?;
        if roots.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no certificate in the PEM roots",
            ));
        }
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)))
            .build();
        Ok(Self::with_tls(max_attempts, initial_backoff, tls))
    }

    fn with_tls(max_attempts: u32, initial_backoff: Duration, tls: ureq::tls::TlsConfig) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_body(Some(Duration::from_secs(60)))
            .tls_config(tls)
            .build()
            .into();
        Self {
            agent,
            max_attempts: max_attempts.max(1),
            initial_backoff,
        }
    }
}

/// A file placed by [`materialize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Materialized {
    /// Where it is.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
}

/// Fetches every volume into `<job_dir>/volume/<path>`. Paths are validated first (all of them,
/// before anything is fetched); each file is complete and checked before it appears.
///
/// Nothing here is fsynced except what [`blob::get_to_file`] does for its own resume state: a
/// volume lives only as long as its job (the job directory is removed before the job starts and
/// after it ends), so there is nothing a crash could leave for anyone to trust: after a crash the
/// job is gone and a new run fetches anew. The job reads the checked bytes from the page cache
/// they were written to. What an fsync would add is an error for a write-back failure (the disk
/// failing under the file after the check); without it such a failure shows as the job's own
/// read error or bad data, as for any file the job writes and reads back itself.
pub async fn materialize(
    job_dir: &Path,
    volumes: &[VolumeSpec],
    endpoint: &HordeEndpoint,
    http: &HttpClient,
) -> Result<Vec<Materialized>, VolumeError> {
    let paths = checked_paths(volumes.iter().map(|volume| &volume.path))?;
    let root = job_dir.join(VOLUME_DIR);
    let staging = job_dir.join(STAGING_DIR);
    for dir in [&root, &staging] {
        ensure_real_dir(dir)?;
    }
    let mut placed = Vec::with_capacity(volumes.len());
    for (index, (volume, relative)) in volumes.iter().zip(paths).enumerate() {
        let shown = volume.path.0.clone();
        prepare_target(&root, &relative)?;
        let staged = staging.join(format!("volume-{index}"));
        let size = match &volume.source {
            VolumeSource::Inline { bytes } => {
                write_new_file(&staged, bytes).map_err(|source| VolumeError::Io {
                    path: shown.clone(),
                    source,
                })?;
                bytes.len() as u64
            }
            VolumeSource::Blob {
                hash,
                size,
                storage,
            } => {
                let outcome = blob::get_to_file(
                    endpoint,
                    storage,
                    *hash,
                    &staged,
                    Some(*size),
                    DEFAULT_MAX_VOLUME_SIZE,
                    &blob::TransferPolicy::default(),
                    &mut NoProgress,
                )
                .await
                .map_err(VolumeError::blob(&shown))?;
                outcome.size
            }
            VolumeSource::Url { url, size, blake3 } => {
                let http = http.clone();
                let (url, size, blake3, staged) = (url.clone(), *size, *blake3, staged.clone());
                let path = shown.clone();
                tokio::task::spawn_blocking(move || {
                    fetch_url(&http, &url, &staged, size, blake3, &path)
                })
                .await
                .map_err(|error| VolumeError::Io {
                    path: shown.clone(),
                    source: io::Error::other(error),
                })??
            }
            _ => return Err(VolumeError::Unsupported(shown)),
        };
        // Placed through directory handles opened without following symlinks: a directory
        // swapped for a symlink since `prepare_target` is refused, never followed.
        let target = place_file(&staging, &staged, &root, &relative)?;
        debug!(path = %shown, size, "volume ready");
        placed.push(Materialized { path: target, size });
    }
    Ok(placed)
}

fn ensure_real_dir(dir: &Path) -> Result<(), VolumeError> {
    let shown = dir.display().to_string();
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => {
            Err(path_error(&shown, PathError::Symlink(shown.clone())))
        }
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(path_error(&shown, PathError::NotADirectory(shown.clone()))),
        Err(_) => fs::create_dir_all(dir).map_err(|source| VolumeError::Io {
            path: shown,
            source,
        }),
    }
}

fn write_new_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(bytes)
}

/// What one HTTP GET attempt ended with.
enum Attempt {
    Done,
    Retry(String),
}

/// Downloads `url` into `dest` (blocking), resuming with `Range` after a dropped connection,
/// then checks the size and BLAKE3 of what was received. On a check failure `dest` is deleted.
fn fetch_url(
    http: &HttpClient,
    url: &str,
    dest: &Path,
    expected_size: Option<u64>,
    expected_hash: Option<BlobHash>,
    shown: &str,
) -> Result<u64, VolumeError> {
    let io_error = |source| VolumeError::Io {
        path: shown.to_owned(),
        source,
    };
    let _ = fs::remove_file(dest);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(io_error)?;
    // `dest` is new and only written here, so `received` always describes exactly its bytes:
    // a resumed attempt extends the hash of the prefix the earlier attempts wrote.
    let mut received = HashedDownload::start().map_err(io_error)?;
    let mut backoff = http.initial_backoff;
    let mut attempt = 1;
    let fetched = loop {
        match fetch_attempt(http, url, &mut file, &mut received, expected_size) {
            Ok(Attempt::Done) => break Ok(()),
            Ok(Attempt::Retry(message)) if attempt < http.max_attempts => {
                info!(url, attempt, %message, "HTTP download interrupted, retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff *= 2;
                attempt += 1;
            }
            Ok(Attempt::Retry(message)) => {
                break Err(VolumeError::Http {
                    url: url.to_owned(),
                    message,
                    attempts: attempt,
                });
            }
            Err(error) => break Err(error),
        }
    };
    let hashed = received.finish();
    let checked = fetched.and_then(|()| hashed.check(expected_size, expected_hash, shown));
    drop(file);
    if checked.is_err() {
        let _ = fs::remove_file(dest);
    }
    checked
}

/// The bytes of a download written so far: their count and BLAKE3, fed with each chunk as it
/// is written, so the file is never read back to be checked.
#[derive(Default)]
struct Received {
    len: u64,
    hasher: blake3::Hasher,
}

impl Received {
    fn append(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// The size and hash of everything received against the declared ones.
    fn check(
        &self,
        expected_size: Option<u64>,
        expected_hash: Option<BlobHash>,
        shown: &str,
    ) -> Result<u64, VolumeError> {
        if let Some(expected) = expected_size
            && expected != self.len
        {
            return Err(VolumeError::SizeMismatch {
                path: shown.to_owned(),
                expected,
                actual: self.len,
            });
        }
        let hash = BlobHash(*self.hasher.finalize().as_bytes());
        if let Some(expected) = expected_hash
            && expected != hash
        {
            return Err(VolumeError::HashMismatch {
                path: shown.to_owned(),
                expected,
                actual: hash,
            });
        }
        Ok(self.len)
    }
}

/// A download's bytes, hashed on a helper thread while the receiving thread reads and writes
/// the next piece: the BLAKE3 of a piece overlaps the network and the file write instead of
/// following them. Pieces go to the hasher in order and come back as empty buffers.
struct HashedDownload {
    len: u64,
    pieces: std::sync::mpsc::SyncSender<Piece>,
    spares: std::sync::mpsc::Receiver<Vec<u8>>,
    hasher: std::thread::JoinHandle<blake3::Hasher>,
}

/// What the hasher thread is sent.
enum Piece {
    /// The next bytes of the file.
    Bytes(Vec<u8>),
    /// The file was started over: forget what was hashed.
    Restart,
}

/// Buffers of [`FETCH_CHUNK`] in flight between the receiving thread and the hasher.
const HASH_BUFFERS: usize = 4;

impl HashedDownload {
    fn start() -> io::Result<Self> {
        let (pieces, to_hash) = std::sync::mpsc::sync_channel::<Piece>(HASH_BUFFERS);
        let (spare, spares) = std::sync::mpsc::sync_channel(HASH_BUFFERS);
        for _ in 0..HASH_BUFFERS {
            let _ = spare.try_send(vec![0u8; FETCH_CHUNK]);
        }
        let hasher = std::thread::Builder::new()
            .name("volume-hash".into())
            .spawn(move || {
                let mut hasher = blake3::Hasher::new();
                for piece in to_hash {
                    match piece {
                        Piece::Bytes(mut bytes) => {
                            hasher.update(&bytes);
                            bytes.resize(FETCH_CHUNK, 0);
                            let _ = spare.try_send(bytes);
                        }
                        Piece::Restart => {
                            hasher.reset();
                        }
                    }
                }
                hasher
            })?;
        Ok(Self {
            len: 0,
            pieces,
            spares,
            hasher,
        })
    }

    /// An empty buffer of [`FETCH_CHUNK`] bytes to read the next piece into (waits for the
    /// hasher when every buffer is queued for it).
    fn buffer(&self) -> io::Result<Vec<u8>> {
        self.spares.recv().map_err(|_| hasher_stopped())
    }

    /// The first `filled` bytes of `buffer` are the file's next bytes (already written).
    fn append(&mut self, mut buffer: Vec<u8>, filled: usize) -> io::Result<()> {
        buffer.truncate(filled);
        self.len += filled as u64;
        self.pieces
            .send(Piece::Bytes(buffer))
            .map_err(|_| hasher_stopped())
    }

    fn restart(&mut self) -> io::Result<()> {
        self.len = 0;
        self.pieces
            .send(Piece::Restart)
            .map_err(|_| hasher_stopped())
    }

    /// The count and hash of everything appended since the last restart.
    fn finish(self) -> Received {
        let Self {
            len,
            pieces,
            spares,
            hasher,
        } = self;
        drop(pieces);
        drop(spares);
        let hasher = hasher.join().unwrap_or_else(|_| blake3::Hasher::new());
        Received { len, hasher }
    }
}

/// The hasher thread is gone (it ends only when its channels close, or by a panic).
fn hasher_stopped() -> io::Error {
    io::Error::other("the volume's hasher thread stopped")
}

/// Reads from `reader` until `buffer` is full or the body ends; the count read, and the error
/// that stopped it early, if any (the bytes before it are still good).
fn fill(reader: &mut impl io::Read, buffer: &mut [u8]) -> (usize, Option<io::Error>) {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return (filled, Some(error)),
        }
    }
    (filled, None)
}

/// Bytes of the response body gathered per `write` (and per piece hashed).
const FETCH_CHUNK: usize = 256 * 1024;

/// One GET: asks for the bytes after what `file` holds (`received`) and appends them.
fn fetch_attempt(
    http: &HttpClient,
    url: &str,
    file: &mut File,
    received: &mut HashedDownload,
    expected_size: Option<u64>,
) -> Result<Attempt, VolumeError> {
    let io_error = |source| VolumeError::Io {
        path: url.to_owned(),
        source,
    };
    let held = received.len;
    if held > 0 && expected_size == Some(held) {
        return Ok(Attempt::Done);
    }
    let mut request = http.agent.get(url);
    if held > 0 {
        request = request.header("Range", format!("bytes={held}-"));
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(error) => return Ok(Attempt::Retry(error.to_string())),
    };
    let status = response.status().as_u16();
    let append = match status {
        200 => false,
        // Not the range we asked for: start over rather than splice wrong bytes.
        206 => {
            response
                .headers()
                .get("content-range")
                .and_then(|value| value.to_str().ok())
                .and_then(content_range_start)
                == Some(held)
        }
        416 if held > 0 => return Ok(Attempt::Done),
        500..=599 | 408 | 429 => return Ok(Attempt::Retry(format!("HTTP status {status}"))),
        _ => {
            return Err(VolumeError::HttpStatus {
                url: url.to_owned(),
                status,
            });
        }
    };
    if !append && held > 0 {
        use std::io::Seek as _;
        file.set_len(0).map_err(io_error)?;
        file.rewind().map_err(io_error)?;
        received.restart().map_err(io_error)?;
    }
    let mut reader = response.into_body().into_reader();
    loop {
        let mut buffer = received.buffer().map_err(io_error)?;
        let (filled, error) = fill(&mut reader, &mut buffer);
        file.write_all(&buffer[..filled]).map_err(io_error)?;
        received.append(buffer, filled).map_err(io_error)?;
        if let Some(expected) = expected_size
            && received.len > expected
        {
            return Err(VolumeError::SizeMismatch {
                path: url.to_owned(),
                expected,
                actual: received.len,
            });
        }
        match error {
            Some(error) => return Ok(Attempt::Retry(error.to_string())),
            None if filled < FETCH_CHUNK => return Ok(Attempt::Done),
            None => {}
        }
    }
}

/// `bytes N-M/T` → N.
fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> RelativePath {
        RelativePath(text.to_owned())
    }

    /// A self-signed P-256 CA certificate (openssl, valid until 2126): a fixture, not a secret.
    const TEST_CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBhjCCAS2gAwIBAgIUES1zzrbavmOpSYtI5YDzhj1x2FswCgYIKoZIzj0EAwIw\n\
GDEWMBQGA1UEAwwNaG9yZGUtdGVzdC1jYTAgFw0yNjEyMDUxNzI2MDhaGA8yMTI2\n\
MTExMTE3MjYwOFowGDEWMBQGA1UEAwwNaG9yZGUtdGVzdC1jYTBZMBMGByqGSM49\n\
AgEGCCqGSM49AwEHA0IABMYZiBga3Wdzp4kANgGHLKlrjP0dre0+g/dx02DTWiw0\n\
l8SOKLiR/IZUGxjolctOl09CQdyVhJURciXx9JLFrZijUzBRMB0GA1UdDgQWBBSY\n\
hSn6JEMdfMAmguM4O/waYgKnDTAfBgNVHSMEGDAWgBSYhSn6JEMdfMAmguM4O/wa\n\
YgKnDTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIHUIitsw47v2\n\
UfI2nC1iNgdZ83HIxpa8ZxNemVgXz2tiAiA2ZOKSIWup56Rg/9J+nFFFfS6Lkxk9\n\
OSBRsWvRavtcZA==\n\
-----END CERTIFICATE-----\n\
";

    #[test]
    fn https_roots_must_hold_a_certificate() {
        let client =
            HttpClient::with_roots_pem(2, Duration::from_millis(1), TEST_CA_PEM.as_bytes())
                .expect("a CA certificate is accepted");
        assert_eq!(client.max_attempts, 2);
        for pem in [
            "".as_bytes(),
            b"not PEM at all",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        ] {
            let error = HttpClient::with_roots_pem(1, Duration::ZERO, pem).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        }
    }

    #[test]
    fn bad_names_are_refused_with_the_right_reason() {
        let long_component = "a".repeat(MAX_COMPONENT_LEN + 1);
        let long_path = vec!["abcdefgh"; MAX_PATH_LEN / 9 + 1].join("/");
        let cases: Vec<(&str, PathError)> = vec![
            ("", PathError::Empty),
            ("..", PathError::ParentDir),
            ("../etc/passwd", PathError::ParentDir),
            ("a/../../b", PathError::ParentDir),
            ("a/..", PathError::ParentDir),
            ("/etc/passwd", PathError::Absolute),
            ("/", PathError::Absolute),
            (".", PathError::CurrentDir),
            ("./a", PathError::CurrentDir),
            ("a/./b", PathError::CurrentDir),
            ("a//b", PathError::EmptyComponent),
            ("a/", PathError::EmptyComponent),
            ("a\0b", PathError::Nul),
            ("a\\b", PathError::Backslash),
            ("..\\..\\windows", PathError::Backslash),
            (
                &long_component,
                PathError::ComponentTooLong(MAX_COMPONENT_LEN + 1),
            ),
            (&long_path, PathError::TooLong(long_path.len())),
        ];
        for (name, expected) in cases {
            assert_eq!(
                validate_relative_path(&path(name)),
                Err(expected.clone()),
                "{name:?}"
            );
        }
        for good in [
            "a",
            "a/b/c.txt",
            "..a",
            "a..",
            ".hidden",
            "x/.y",
            &"a".repeat(255),
        ] {
            assert!(validate_relative_path(&path(good)).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn duplicates_and_file_parent_clashes_are_refused() {
        let check = |names: &[&str]| {
            let paths: Vec<RelativePath> = names.iter().map(|n| path(n)).collect();
            validate_paths(&paths)
                .map(|_| ())
                .map_err(|(_, error)| error)
        };
        assert_eq!(check(&["a", "b", "c/d"]), Ok(()));
        assert_eq!(check(&["a", "a"]), Err(PathError::Duplicate));
        assert_eq!(
            check(&["a", "a/b"]),
            Err(PathError::FileIsParent("a".to_owned()))
        );
        assert_eq!(
            check(&["a/b/c", "a/b"]),
            Err(PathError::FileIsParent("a/b".to_owned()))
        );
        assert_eq!(check(&["a/b", "a/c"]), Ok(()));
    }

    #[test]
    fn symlinks_on_the_way_or_at_the_target_are_refused() {
        let job = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = job.path().join("volume");
        fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("x"), root.join("dangling")).unwrap();
        fs::write(root.join("file"), b"x").unwrap();

        // The path refusal `prepare_target` answers for `relative`.
        let refusal = |relative: &str| match prepare_target(&root, Path::new(relative)) {
            Err(VolumeError::Path { source, .. }) => source,
            other => panic!("{relative}: {other:?}"),
        };
        assert_eq!(
            refusal("escape/owned"),
            PathError::Symlink("escape".to_owned())
        );
        assert!(matches!(refusal("dangling"), PathError::Symlink(_)));
        assert!(matches!(refusal("file/x"), PathError::NotADirectory(_)));
        assert!(matches!(refusal("file"), PathError::Exists(_)));
        let ok = prepare_target(&root, Path::new("new/dir/file")).unwrap();
        assert_eq!(ok, root.join("new/dir/file"));
        assert!(root.join("new/dir").is_dir());
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn outputs_are_opened_without_following_symlinks_and_read_as_opened() {
        let job = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = job.path().join("output");
        fs::create_dir_all(root.join("a")).unwrap();
        fs::write(root.join("a/result"), b"the job's result").unwrap();
        fs::write(outside.path().join("result"), b"someone else's file").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("result"), root.join("link")).unwrap();
        let refusal = |relative: &str| match open_output(&root, Path::new(relative), relative) {
            Err(VolumeError::Path { source, .. }) => source,
            other => panic!("{relative}: {other:?}"),
        };
        assert_eq!(
            refusal("escape/result"),
            PathError::Symlink("escape".to_owned())
        );
        assert_eq!(refusal("link"), PathError::Symlink("link".to_owned()));
        assert!(matches!(
            open_output(&root, Path::new("a/none"), "a/none"),
            Err(VolumeError::Output { .. })
        ));
        assert!(matches!(
            open_output(&root, Path::new("b/none"), "b/none"),
            Err(VolumeError::Output { .. })
        ));

        // Once opened, the output is read as opened: swapping `a` for a symlink to a directory
        // outside changes nothing in what is hashed and sent.
        let file = open_output(&root, Path::new("a/result"), "a/result").unwrap();
        fs::rename(root.join("a"), job.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("a")).unwrap();
        let (hash, size) = blob::hash_file(&opened_path(&file)).unwrap();
        assert_eq!(size, 16);
        assert_eq!(hash.0, *blake3::hash(b"the job's result").as_bytes());
    }

    #[test]
    fn a_fifo_output_is_refused_without_blocking() {
        let job = tempfile::tempdir().unwrap();
        let root = job.path().join("output");
        fs::create_dir_all(&root).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("pipe"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        // No writer ever opens the FIFO: a blocking open would hang here.
        match open_output(&root, Path::new("pipe"), "pipe") {
            Err(VolumeError::Output { message, .. }) => assert_eq!(message, "not a regular file"),
            other => panic!("{other:?}"),
        }
        // A socket cannot be opened at all (ENXIO): the job's doing too, not an I/O error of
        // the executor's (which would answer its POST /outputs 500).
        let _socket = std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap();
        match open_output(&root, Path::new("socket"), "socket") {
            Err(VolumeError::Output { message, .. }) => {
                assert!(message.starts_with("cannot be opened"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn placement_refuses_a_directory_swapped_for_a_symlink() {
        let job = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = job.path().join("volume");
        let staging = job.path().join(".staging");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&staging).unwrap();
        let relative = Path::new("a/b/file");
        prepare_target(&root, relative).unwrap();
        // After the check, `a` is swapped for a symlink to a directory outside the root.
        fs::remove_dir(root.join("a/b")).unwrap();
        fs::remove_dir(root.join("a")).unwrap();
        fs::create_dir(outside.path().join("b")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("a")).unwrap();
        let staged = staging.join("volume-0");
        fs::write(&staged, b"data").unwrap();

        let err = place_file(&staging, &staged, &root, relative).unwrap_err();
        assert!(
            matches!(err, VolumeError::Path { source: PathError::Symlink(ref at), .. } if at == "a"),
            "{err:?}"
        );
        assert!(!outside.path().join("b/file").exists());
        assert!(staged.exists());

        // A symlinked last directory is refused too.
        fs::remove_file(root.join("a")).unwrap();
        fs::create_dir(root.join("a")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("b"), root.join("a/b")).unwrap();
        let err = place_file(&staging, &staged, &root, relative).unwrap_err();
        assert!(
            matches!(err, VolumeError::Path { source: PathError::Symlink(ref at), .. } if at == "a/b"),
            "{err:?}"
        );
        assert!(!outside.path().join("b/file").exists());

        // Real directories: placed; an existing name is never replaced.
        fs::remove_file(root.join("a/b")).unwrap();
        let placed = place_file(&staging, &staged, &root, relative).unwrap();
        assert_eq!(placed, root.join("a/b/file"));
        assert_eq!(fs::read(&placed).unwrap(), b"data");
        fs::write(&staged, b"other").unwrap();
        let err = place_file(&staging, &staged, &root, relative).unwrap_err();
        assert!(
            matches!(
                err,
                VolumeError::Path {
                    source: PathError::Exists(_),
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(fs::read(&placed).unwrap(), b"data");
    }
}
