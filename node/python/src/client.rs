//! `horde.Client`: an account key and a facilitator; submits job specs and attaches to jobs
//! by id. Its jobs share one QUIC connection to the facilitator (the Rust client's), so one
//! client runs many jobs at once.

use horde_node::client::{Client as RustClient, JobRequest};
use horde_protocol::{JobId, NodeAddr};
use pyo3::prelude::*;

use crate::errors::{Failure, HordeError};
use crate::job::{Job, within};
use crate::keys::Key;
use crate::runtime::{ProcessBound, awaitable, block_on, runtime};

/// A client of one facilitator, with an account key.
#[pyclass(module = "horde._native", frozen)]
#[derive(Debug)]
pub(crate) struct Client {
    inner: RustClient,
    process: ProcessBound,
}

impl Client {
    fn inner(&self) -> PyResult<RustClient> {
        self.process.check("client")?;
        Ok(self.inner.clone())
    }
}

async fn submit(client: RustClient, spec: String, timeout: Option<f64>) -> PyResult<Job> {
    let request = JobRequest::from_toml(&spec).map_err(|e| Failure::InvalidSpec(e.to_string()))?;
    let handle = within(timeout, "submit", async {
        client.submit(&request).await.map_err(Failure::from)
    })
    .await?;
    Job::start(handle, client)
}

async fn attach(
    client: RustClient,
    job_id: JobId,
    client_key: Option<Key>,
    timeout: Option<f64>,
) -> PyResult<Job> {
    let handle = within(timeout, "attach", async {
        client
            .attach(job_id, client_key.map(|k| k.secret))
            .await
            .map_err(Failure::from)
    })
    .await?;
    Job::start(handle, client)
}

fn parse_job_id(job_id: &str) -> PyResult<JobId> {
    job_id
        .parse()
        .map_err(|_| HordeError::new_err(format!("job id must be 32 hex digits, got {job_id:?}")))
}

#[pymethods]
impl Client {
    /// A client with `account_key` as its identity, talking to `facilitator`
    /// (`HOTKEY@IP:PORT`, as `horde-testnet up` prints it).
    #[new]
    fn new(account_key: &Key, facilitator: &str) -> PyResult<Self> {
        let facilitator: NodeAddr = facilitator.parse().map_err(|e| {
            HordeError::new_err(format!(
                "facilitator {facilitator:?}: {e} (expected HOTKEY@IP:PORT)"
            ))
        })?;
        // The endpoint's socket is registered with this process's runtime.
        let _guard = runtime()?.enter();
        let inner =
            RustClient::new(account_key.secret.clone(), facilitator).map_err(Failure::from)?;
        Ok(Self {
            inner,
            process: ProcessBound::here(),
        })
    }

    /// The account key's SS58 address.
    #[getter]
    fn account(&self) -> String {
        self.inner.account().to_string()
    }

    /// Signs and submits a job spec given as TOML (the fields of `job.toml`; `horde.JobSpec`
    /// writes it) and returns its handle once the facilitator has taken it.
    #[pyo3(signature = (spec, timeout = None))]
    fn submit_toml(&self, py: Python<'_>, spec: String, timeout: Option<f64>) -> PyResult<Job> {
        block_on(py, submit(self.inner()?, spec, timeout))
    }

    /// `submit_toml`, awaitable.
    #[pyo3(signature = (spec, timeout = None))]
    fn submit_toml_async<'py>(
        &self,
        py: Python<'py>,
        spec: String,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        awaitable(py, submit(self.inner()?, spec, timeout))
    }

    /// Attaches to a job of this account by id (its history is replayed). Give the job's
    /// `client_key` to reach its endpoint as well.
    #[pyo3(signature = (job_id, client_key = None, timeout = None))]
    fn attach(
        &self,
        py: Python<'_>,
        job_id: &str,
        client_key: Option<Key>,
        timeout: Option<f64>,
    ) -> PyResult<Job> {
        let job_id = parse_job_id(job_id)?;
        block_on(py, attach(self.inner()?, job_id, client_key, timeout))
    }

    /// `attach`, awaitable.
    #[pyo3(signature = (job_id, client_key = None, timeout = None))]
    fn attach_async<'py>(
        &self,
        py: Python<'py>,
        job_id: &str,
        client_key: Option<Key>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let job_id = parse_job_id(job_id)?;
        awaitable(py, attach(self.inner()?, job_id, client_key, timeout))
    }

    /// Closes the shared connection to the facilitator (jobs keep running); call before exit
    /// so the facilitator frees its slot at once.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner()?;
        block_on(py, async move {
            inner.close().await;
            Ok(())
        })
    }

    fn __repr__(&self) -> String {
        format!("Client({})", self.inner.account())
    }
}
