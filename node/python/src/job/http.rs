//! Responses from a job: [`buffered`] (the whole body, then the verified receipt), [`streamed`]
//! ([`ResponseStream`]: the body's exact bytes as they arrive, then the receipt) and
//! [`forward`] ([`Forward`]: a local TCP port tunnelled to the job).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use horde_transport::tunnel::{HttpResponseStream, MAX_HTTP_RESPONSE, RequestBody, forward_tcp};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::sync::{Mutex, mpsc};

use super::JobShared;
use crate::errors::Failure;
use crate::runtime::{ProcessBound, awaitable, block_on};
use crate::types::Receipt;

/// Receipts of forwarded connections waiting to be counted: the counter keeps up with any
/// rate, a few are enough.
const FORWARD_RECEIPTS: usize = 16;

/// Bytes handed to Python as `bytes`.
#[derive(Debug)]
pub(crate) struct BytesOut(pub(crate) bytes::Bytes);

impl<'py> IntoPyObject<'py> for BytesOut {
    type Target = PyBytes;
    type Output = Bound<'py, PyBytes>;
    type Error = std::convert::Infallible;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        Ok(PyBytes::new(py, &self.0))
    }
}

/// A whole response: status, headers, body, receipt (a tuple in Python; `horde.Response`
/// wraps it).
pub(crate) type Buffered = (u16, Vec<(String, String)>, BytesOut, Receipt);

async fn open(
    shared: &JobShared,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(String, String)],
) -> Result<(HttpResponseStream, horde_protocol::Hotkey), Failure> {
    let connection = shared.connection().await?;
    let job_key = connection.tunnel.job_key();
    let response = connection
        .request_with_headers(method, path, headers, RequestBody::<&[u8]>::Bytes(body))
        .await?;
    Ok((response, job_key))
}

/// One request, its response read whole (at most `MAX_HTTP_RESPONSE` bytes), the receipt
/// verified.
pub(crate) async fn buffered(
    shared: &JobShared,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(String, String)],
) -> Result<Buffered, Failure> {
    let (mut response, job_key) = open(shared, method, path, body, headers).await?;
    let mut collected = bytes::BytesMut::new();
    while let Some(piece) = response.next_body().await? {
        if collected.len() + piece.len() > MAX_HTTP_RESPONSE {
            return Err(Failure::Protocol(format!(
                "response larger than {MAX_HTTP_RESPONSE} bytes: use stream()"
            )));
        }
        if collected.is_empty() {
            collected = bytes::BytesMut::from(piece);
        } else {
            collected.extend_from_slice(&piece);
        }
    }
    let (status, headers) = (response.status, std::mem::take(&mut response.headers));
    let receipt = Receipt::verified(response.finish().await?, &job_key)?;
    Ok((status, headers, BytesOut(collected.freeze()), receipt))
}

/// One request whose body is read as it arrives.
pub(crate) async fn streamed(
    shared: &JobShared,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(String, String)],
) -> Result<ResponseStream, Failure> {
    let (response, job_key) = open(shared, method, path, body, headers).await?;
    Ok(ResponseStream {
        status: response.status,
        headers: response.headers.clone(),
        inner: Arc::new(Mutex::new(Some(response))),
        job_key,
        process: ProcessBound::here(),
    })
}

/// A response read as it arrives: `read()` gives the body's next bytes (exact, de-chunked;
/// `None` at the end), `finish()` reads the rest and returns the job's verified receipt. Until
/// `finish` returns, the bytes are unproven.
#[pyclass(module = "horde._native", frozen)]
#[derive(Debug)]
pub(crate) struct ResponseStream {
    /// The status code.
    #[pyo3(get)]
    status: u16,
    /// Header names and values, in order, as sent.
    #[pyo3(get)]
    headers: Vec<(String, String)>,
    inner: Arc<Mutex<Option<HttpResponseStream>>>,
    job_key: horde_protocol::Hotkey,
    process: ProcessBound,
}

impl ResponseStream {
    fn parts(
        &self,
    ) -> PyResult<(
        Arc<Mutex<Option<HttpResponseStream>>>,
        horde_protocol::Hotkey,
    )> {
        self.process.check("response stream")?;
        Ok((Arc::clone(&self.inner), self.job_key))
    }
}

async fn read(inner: Arc<Mutex<Option<HttpResponseStream>>>) -> PyResult<Option<BytesOut>> {
    let mut guard = inner.lock().await;
    let Some(response) = guard.as_mut() else {
        return Ok(None);
    };
    Ok(response
        .next_body()
        .await
        .map_err(Failure::from)?
        .map(BytesOut))
}

async fn finish(
    inner: Arc<Mutex<Option<HttpResponseStream>>>,
    job_key: horde_protocol::Hotkey,
) -> PyResult<Receipt> {
    let response = inner
        .lock()
        .await
        .take()
        .ok_or_else(|| Failure::Protocol("the response was finished already".to_owned()))?;
    let signed = response.finish().await.map_err(Failure::from)?;
    Ok(Receipt::verified(signed, &job_key)?)
}

#[pymethods]
impl ResponseStream {
    /// The body's next bytes as they arrive; `None` at its end.
    fn read(&self, py: Python<'_>) -> PyResult<Option<BytesOut>> {
        let (inner, _) = self.parts()?;
        block_on(py, read(inner))
    }

    /// `read`, awaitable.
    fn read_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (inner, _) = self.parts()?;
        awaitable(py, read(inner))
    }

    /// Reads the rest of the stream and returns the job's verified receipt.
    fn finish(&self, py: Python<'_>) -> PyResult<Receipt> {
        let (inner, job_key) = self.parts()?;
        block_on(py, finish(inner, job_key))
    }

    /// `finish`, awaitable.
    fn finish_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (inner, job_key) = self.parts()?;
        awaitable(py, finish(inner, job_key))
    }
}

/// Starts forwarding a local port to the job.
pub(crate) async fn forward(shared: &JobShared, port: u16) -> Result<Forward, Failure> {
    let connection = shared.connection().await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| Failure::Io(format!("listening on 127.0.0.1:{port}: {e}")))?;
    let address = listener
        .local_addr()
        .map_err(|e| Failure::Io(e.to_string()))?;
    let (receipts_tx, mut receipts) = mpsc::channel(FORWARD_RECEIPTS);
    let counted = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&counted);
    let tunnel = connection.tunnel.clone();
    let task = tokio::spawn(async move {
        let counter = async move {
            while receipts.recv().await.is_some() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        };
        let _ = tokio::join!(forward_tcp(listener, tunnel, receipts_tx), counter);
    });
    Ok(Forward {
        url: format!("http://{address}"),
        port: address.port(),
        receipts: counted,
        task: task.abort_handle(),
    })
}

/// A local port tunnelled to the job (every connection its own tunnel stream, its receipt
/// verified). A context manager: leaving it stops listening.
#[pyclass(module = "horde._native", frozen)]
#[derive(Debug)]
pub(crate) struct Forward {
    /// `http://127.0.0.1:PORT`.
    #[pyo3(get)]
    url: String,
    /// The local port.
    #[pyo3(get)]
    port: u16,
    receipts: Arc<AtomicU64>,
    task: tokio::task::AbortHandle,
}

#[pymethods]
impl Forward {
    /// Verified receipts of forwarded connections that have ended.
    #[getter]
    fn receipts(&self) -> u64 {
        self.receipts.load(Ordering::Relaxed)
    }

    /// Stops listening and ends the forwarded connections.
    fn close(&self) {
        self.task.abort();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _kind: Option<Bound<'_, PyAny>>,
        _value: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) {
        self.close();
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}
