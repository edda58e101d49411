//! Blobs on a storage node (`horde/blob/1`, the Rust client's transfers with their retries,
//! resume and verification): `blob_put(storage, path)` → hash, `blob_get(storage, hash, path)`
//! into a file (`None`) or into memory (`bytes`), with a progress callback `(done, total)`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use horde_node::client::blob::{TransferPolicy, get_to_file, get_to_memory, put_file};
use horde_node::client::progress::Progress;
use horde_protocol::blob::DEFAULT_MAX_BLOB_SIZE;
use horde_protocol::{BlobHash, NodeAddr, SecretKey};
use horde_transport::{ALPN_BLOB, EndpointConfig, HordeEndpoint};
use pyo3::prelude::*;

use crate::errors::{Failure, HordeError};
use crate::job::http::BytesOut;
use crate::keys::Key;
use crate::runtime::{awaitable, block_on};

/// The shortest time between two progress callbacks (besides the first and the last): often
/// enough for a progress bar, rare enough that Python costs nothing next to the transfer.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Calls a Python callable with `(done, total)` as a transfer goes.
#[derive(Debug)]
struct PythonProgress {
    callback: Option<Py<PyAny>>,
    total: u64,
    last: Option<Instant>,
}

impl PythonProgress {
    fn call(&mut self, done: u64, force: bool) {
        let Some(callback) = &self.callback else {
            return;
        };
        if !force
            && self
                .last
                .is_some_and(|last| last.elapsed() < PROGRESS_INTERVAL)
        {
            return;
        }
        self.last = Some(Instant::now());
        let total = self.total;
        Python::attach(|py| {
            if let Err(error) = callback.call1(py, (done, total)) {
                error.write_unraisable(py, Some(callback.bind(py)));
            }
        });
    }
}

impl Progress for PythonProgress {
    fn start(&mut self, total: u64, done: u64) {
        self.total = total;
        self.call(done, true);
    }

    fn update(&mut self, done: u64) {
        self.call(done, done == self.total);
    }
}

/// A blob endpoint for one transfer: on loopback when the node is (so a test network's
/// traffic stays there).
fn endpoint(key: Option<Key>, storage: &NodeAddr) -> Result<HordeEndpoint, Failure> {
    let bind = match storage.addrs.first() {
        Some(addr) if addr.ip().is_loopback() && addr.is_ipv4() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
        }
        Some(addr) if addr.is_ipv6() => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        _ => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
    };
    let key = key.map_or_else(SecretKey::generate, |k| k.secret);
    HordeEndpoint::bind(&key, EndpointConfig::new(bind, &[ALPN_BLOB]))
        .map_err(|e| Failure::Protocol(format!("blob endpoint: {e}")))
}

fn parse_storage(storage: &str) -> PyResult<NodeAddr> {
    storage.parse().map_err(|e| {
        HordeError::new_err(format!(
            "storage {storage:?}: {e} (expected HOTKEY@IP:PORT)"
        ))
    })
}

fn parse_hash(hash: &str) -> PyResult<BlobHash> {
    hash.parse()
        .map_err(|_| HordeError::new_err(format!("blob hash must be 64 hex digits, got {hash:?}")))
}

async fn closing<T>(endpoint: HordeEndpoint, result: Result<T, Failure>) -> PyResult<T> {
    horde_transport::close_endpoint_promptly(&endpoint, horde_transport::codes::SHUTDOWN, b"done")
        .await;
    Ok(result?)
}

async fn put(
    storage: NodeAddr,
    path: PathBuf,
    progress: Option<Py<PyAny>>,
    key: Option<Key>,
) -> PyResult<String> {
    let endpoint = endpoint(key, &storage)?;
    let mut progress = PythonProgress {
        callback: progress,
        total: 0,
        last: None,
    };
    let policy = TransferPolicy::default();
    let result = put_file(&endpoint, &storage, &path, &policy, &mut progress).await;
    closing(
        endpoint,
        result.map(|hash| hash.to_string()).map_err(Failure::from),
    )
    .await
}

async fn get(
    storage: NodeAddr,
    hash: BlobHash,
    path: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
    max_size: u64,
    key: Option<Key>,
) -> PyResult<Option<BytesOut>> {
    let endpoint = endpoint(key, &storage)?;
    let policy = TransferPolicy::default();
    let mut progress = PythonProgress {
        callback: progress,
        total: 0,
        last: None,
    };
    let result = match path {
        Some(path) => get_to_file(
            &endpoint,
            &storage,
            hash,
            &path,
            None,
            max_size,
            &policy,
            &mut progress,
        )
        .await
        .map(|_| None),
        None => get_to_memory(&endpoint, &storage, hash, max_size, &policy, &mut progress)
            .await
            .map(|bytes| Some(BytesOut(bytes))),
    };
    closing(endpoint, result.map_err(Failure::from)).await
}

/// Uploads the file at `path` to `storage`; returns its BLAKE3 hash (hex).
#[pyfunction]
#[pyo3(signature = (storage, path, progress = None, key = None))]
pub(crate) fn blob_put(
    py: Python<'_>,
    storage: &str,
    path: PathBuf,
    progress: Option<Py<PyAny>>,
    key: Option<Key>,
) -> PyResult<String> {
    block_on(py, put(parse_storage(storage)?, path, progress, key))
}

/// `blob_put`, awaitable.
#[pyfunction]
#[pyo3(signature = (storage, path, progress = None, key = None))]
pub(crate) fn blob_put_async<'py>(
    py: Python<'py>,
    storage: &str,
    path: PathBuf,
    progress: Option<Py<PyAny>>,
    key: Option<Key>,
) -> PyResult<Bound<'py, PyAny>> {
    awaitable(py, put(parse_storage(storage)?, path, progress, key))
}

/// Downloads blob `hash` from `storage`: into `path` (resumable; only a verified blob appears
/// there; returns `None`) or, without a path, into memory (returns the bytes). A blob whose
/// bytes do not match its hash is refused with `IntegrityError`.
#[pyfunction]
#[pyo3(signature = (storage, hash, path = None, progress = None, max_size = DEFAULT_MAX_BLOB_SIZE, key = None))]
pub(crate) fn blob_get(
    py: Python<'_>,
    storage: &str,
    hash: &str,
    path: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
    max_size: u64,
    key: Option<Key>,
) -> PyResult<Option<BytesOut>> {
    let future = get(
        parse_storage(storage)?,
        parse_hash(hash)?,
        path,
        progress,
        max_size,
        key,
    );
    block_on(py, future)
}

/// `blob_get`, awaitable.
#[pyfunction]
#[pyo3(signature = (storage, hash, path = None, progress = None, max_size = DEFAULT_MAX_BLOB_SIZE, key = None))]
pub(crate) fn blob_get_async<'py>(
    py: Python<'py>,
    storage: &str,
    hash: &str,
    path: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
    max_size: u64,
    key: Option<Key>,
) -> PyResult<Bound<'py, PyAny>> {
    let future = get(
        parse_storage(storage)?,
        parse_hash(hash)?,
        path,
        progress,
        max_size,
        key,
    );
    awaitable(py, future)
}

pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(pyo3::wrap_pyfunction!(blob_put, module)?)?;
    module.add_function(pyo3::wrap_pyfunction!(blob_put_async, module)?)?;
    module.add_function(pyo3::wrap_pyfunction!(blob_get, module)?)?;
    module.add_function(pyo3::wrap_pyfunction!(blob_get_async, module)?)?;
    Ok(())
}
