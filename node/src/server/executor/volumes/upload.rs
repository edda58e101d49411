//! Output uploads: [`upload`] sends files from `<job_dir>/output/<path>` to a storage node or
//! an HTTP PUT URL, each opened once without following symlinks and within what the job may
//! still upload ([`OutputBudget`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use horde_protocol::messages::{OutputLocation, OutputRef};
use horde_protocol::{BlobHash, UploadSpec, UploadTarget};
use horde_transport::HordeEndpoint;
use rustix::fs::{Mode, OFlags};
use tracing::info;

use super::{
    HttpClient, OUTPUT_DIR, Received, VolumeError, checked_paths, refuse_walk, walk_to_parent,
};
use crate::client::blob;
use crate::client::progress::NoProgress;

/// Opens an output under `root` without following symlinks on the way, refusing anything but
/// a regular file.
pub(super) fn open_output(root: &Path, relative: &Path, shown: &str) -> Result<File, VolumeError> {
    open_output_if_there(root, relative, shown)?.ok_or_else(|| VolumeError::Output {
        path: shown.to_owned(),
        message: "no such file".to_owned(),
    })
}

/// [`open_output`], with `None` for an output (or a directory on its way) that is not there.
fn open_output_if_there(
    root: &Path,
    relative: &Path,
    shown: &str,
) -> Result<Option<File>, VolumeError> {
    let (dir, file_name, current) = match walk_to_parent(root, relative, false, shown) {
        Ok(walked) => walked,
        Err(VolumeError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(other) => return Err(other),
    };
    // `O_NONBLOCK`: a FIFO put there by the job must not block the executor in `open`; it is
    // then refused as not a regular file (reads from a regular file never block anyway).
    let file = match rustix::fs::openat(
        &dir,
        file_name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(file) => File::from(file),
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        // A socket (ENXIO), a file the job made unreadable: what the job put there, not the
        // executor's I/O failing.
        Err(
            errno @ (rustix::io::Errno::NXIO | rustix::io::Errno::ACCESS | rustix::io::Errno::PERM),
        ) => {
            return Err(VolumeError::Output {
                path: shown.to_owned(),
                message: format!("cannot be opened: {}", io::Error::from(errno)),
            });
        }
        Err(errno) => return Err(refuse_walk(errno, root, &current, shown)),
    };
    let meta = file.metadata().map_err(|source| VolumeError::Io {
        path: shown.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(VolumeError::Output {
            path: shown.to_owned(),
            message: "not a regular file".to_owned(),
        });
    }
    Ok(Some(file))
}

/// A path that opens the very file `file` has open (Linux's `/proc/self/fd` magic link, not
/// resolved by name): an output opened safely once is read through it however its path changes.
pub(super) fn opened_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// What one job may upload, all its outputs together, over all its uploads: the class's
/// `output_mb`, drawn down by each output sent. An output past what is left is refused before a
/// byte of it is read, so a job cannot keep the executor busy and fill a storage node with, say,
/// a sparse file of terabytes, nor by asking for one upload after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputBudget {
    left: u64,
    max: u64,
}

impl OutputBudget {
    /// A job's whole budget: `max` bytes.
    pub fn new(max: u64) -> Self {
        Self { left: max, max }
    }

    /// Bytes the job may still upload.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// An output of `size` bytes fits in what is left, or the refusal.
    fn check(&self, size: u64, shown: &str) -> Result<(), VolumeError> {
        if size <= self.left {
            return Ok(());
        }
        Err(VolumeError::OverBudget {
            path: shown.to_owned(),
            size,
            max: self.max,
            left: self.left,
        })
    }
}

/// Uploads every output from `<job_dir>/output/<path>` to its target and returns where each
/// went, with its size and BLAKE3, drawing each from the job's `budget`.
pub async fn upload(
    job_dir: &Path,
    uploads: &[UploadSpec],
    endpoint: &HordeEndpoint,
    http: &HttpClient,
    budget: &mut OutputBudget,
) -> Result<Vec<OutputRef>, VolumeError> {
    let paths = checked_paths(uploads.iter().map(|upload| &upload.path))?;
    let root = job_dir.join(OUTPUT_DIR);
    let mut outputs = Vec::with_capacity(uploads.len());
    for (spec, relative) in uploads.iter().zip(paths) {
        let shown = spec.path.0.clone();
        // Opened once, without following a symlink anywhere below `root`; hashed and sent from
        // that open file, never by its name again, so the job cannot swap what is uploaded.
        let file = open_output(&root, &relative, &shown)?;
        let path = opened_path(&file);
        let io_error = |source| VolumeError::Io {
            path: shown.clone(),
            source,
        };
        budget.check(file.metadata().map_err(io_error)?.len(), &shown)?;
        let (hash, size, location) = match &spec.target {
            UploadTarget::Blob { storage } => {
                let (hash, size) = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || blob::hash_file(&path))
                        .await
                        .map_err(|error| io_error(io::Error::other(error)))?
                        .map_err(io_error)?
                };
                // The job may have grown the file since it was opened.
                budget.check(size, &shown)?;
                let policy = blob::TransferPolicy::default();
                // The hash just computed is declared: the file is not read a second time to hash
                // it, and a store that keeps it under another hash is an error of the put.
                blob::put_hashed_file(
                    endpoint,
                    storage,
                    &path,
                    hash,
                    size,
                    &policy,
                    &mut NoProgress,
                )
                .await
                .map_err(VolumeError::blob(&shown))?;
                (hash, size, OutputLocation::Blob(storage.clone()))
            }
            UploadTarget::HttpPut { url, headers } => {
                let (http, url, headers) = (http.clone(), url.clone(), headers.clone());
                let sent_url = url.clone();
                let path = shown.clone();
                // Hashed while it is sent: the size and BLAKE3 reported are those of the bytes
                // the server accepted.
                let budget = *budget;
                let (hash, size) = tokio::task::spawn_blocking(move || {
                    http_put(&http, &url, &headers, file, &path, budget)
                })
                .await
                .map_err(|error| io_error(io::Error::other(error)))??;
                (hash, size, OutputLocation::Url(sent_url))
            }
            _ => return Err(VolumeError::Unsupported(shown)),
        };
        budget.left = budget.left.saturating_sub(size);
        outputs.push(OutputRef {
            path: spec.path.clone(),
            size,
            hash,
            location,
        });
    }
    Ok(outputs)
}

/// Whether an output the job announced mid-session and that was uploaded then (`sent`) needs no
/// second upload at the job's end: the file is still a regular file of the same size and
/// BLAKE3, or it has been removed since (the copy sent stands). A file the job changed, or
/// replaced by anything but a regular file, is sent (or refused) again.
pub async fn unchanged_since(job_dir: &Path, sent: &OutputRef) -> bool {
    let Ok(paths) = checked_paths(std::iter::once(&sent.path)) else {
        return false;
    };
    let Some(relative) = paths.into_iter().next() else {
        return false;
    };
    let file = match open_output_if_there(&job_dir.join(OUTPUT_DIR), &relative, &sent.path.0) {
        Ok(Some(file)) => file,
        Ok(None) => return true,
        Err(_) => return false,
    };
    if file.metadata().map(|meta| meta.len()).ok() != Some(sent.size) {
        return false;
    }
    // At most one byte past the size sent is read: a file still growing is not followed.
    let limit = sent.size.saturating_add(1);
    let now =
        tokio::task::spawn_blocking(move || blob::hash_reader(io::Read::take(file, limit))).await;
    matches!(now, Ok(Ok((hash, size))) if hash == sent.hash && size == sent.size)
}

/// A reader that hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    received: Received,
}

impl<R: io::Read> io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.received.append(&buf[..read]);
        Ok(read)
    }
}

/// PUTs a file with its Content-Length and the given headers (blocking), retrying transport
/// failures and 5xx answers, each attempt within `budget`; returns the BLAKE3 and size of what
/// the accepted attempt sent.
fn http_put(
    http: &HttpClient,
    url: &str,
    headers: &[(String, String)],
    file: File,
    shown: &str,
    budget: OutputBudget,
) -> Result<(BlobHash, u64), VolumeError> {
    use std::io::Seek as _;
    let io_error = |source| VolumeError::Io {
        path: url.to_owned(),
        source,
    };
    let mut file = file;
    let mut backoff = http.initial_backoff;
    let mut attempt = 1;
    loop {
        file.rewind().map_err(io_error)?;
        let size = file.metadata().map_err(io_error)?.len();
        budget.check(size, shown)?;
        let mut request = http.agent.put(url);
        // The length sent is the file's: a Content-Length among the given headers is not used.
        for (name, value) in headers
            .iter()
            .filter(|(name, _)| !name.eq_ignore_ascii_case("content-length"))
        {
            request = request.header(name.as_str(), value.as_str());
        }
        let mut body = HashingReader {
            inner: &file,
            received: Received::default(),
        };
        let sent = request
            .header("Content-Length", size)
            .send(ureq::SendBody::from_reader(&mut body));
        let failure = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                if response.status().is_success() {
                    // The file cannot have changed size unnoticed: the body is sent with this
                    // length, and a short one fails the request.
                    body.received.check(Some(size), None, shown)?;
                    let hash = BlobHash(*body.received.hasher.finalize().as_bytes());
                    return Ok((hash, size));
                }
                if !(500..=599).contains(&status) {
                    return Err(VolumeError::HttpStatus {
                        url: url.to_owned(),
                        status,
                    });
                }
                format!("HTTP status {status}")
            }
            Err(error) => error.to_string(),
        };
        if attempt >= http.max_attempts {
            return Err(VolumeError::Http {
                url: url.to_owned(),
                message: failure,
                attempts: attempt,
            });
        }
        info!(url, attempt, %failure, "HTTP upload failed, retrying in {backoff:?}");
        std::thread::sleep(backoff);
        backoff *= 2;
        attempt += 1;
    }
}
