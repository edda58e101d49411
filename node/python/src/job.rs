//! `horde.Job`: a submitted (or attached) job. Its statuses are read by an actor
//! (`job/actor.rs`) into a state every call reads from, so status iteration, `wait_for_endpoint`,
//! `request` and `terminate` can run at the same time from threads or asyncio tasks. Each
//! blocking method has an `_async` twin returning an awaitable.
//!
//! Lifetimes: dropping the last Python reference closes the status stream (the actor ends); the
//! job keeps running until terminated or its deadline, and `Client.attach(job_id, client_key)`
//! follows it again. The QUIC connection to the job is made on first use (`request`, `stream`,
//! `forward`) and shared by them until `close`.
//!
//! Layout: this file (the class and its calls), `job/actor.rs` (the actor and the shared state),
//! `job/http.rs` (responses: buffered, streamed, and local forwards).

mod actor;
pub(crate) mod http;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use horde_node::client::spec::VolumeListFile;
use horde_node::client::{Client, JobConnection, JobHandle, ReportEvidence, VerifiedEndpoint};
use horde_protocol::{JobId, JobStatus, SecretKey};
use pyo3::prelude::*;
use tokio::sync::{OnceCell, mpsc, oneshot, watch};

use self::actor::{Command, JobState};
use crate::errors::Failure;
use crate::keys::Key;
use crate::runtime::{ProcessBound, awaitable, block_on, runtime};
use crate::types::{Endpoint, Receipt, Status};
use horde_node::client::describe::name as status_name;

/// Everything a call on the job needs, cheap to clone into a future.
#[derive(Debug, Clone)]
pub(crate) struct JobShared {
    pub(crate) job_id: JobId,
    client_key: Option<SecretKey>,
    client: Client,
    state: watch::Receiver<JobState>,
    inbox: mpsc::Sender<Command>,
    connection: Arc<OnceCell<Arc<JobConnection>>>,
}

/// A job on the network: its pushed statuses, its verified endpoint, requests through its
/// tunnel, volume lists, terminate, reports.
#[pyclass(module = "horde._native", frozen)]
#[derive(Debug)]
pub(crate) struct Job {
    shared: JobShared,
    process: ProcessBound,
}

/// Applies an optional timeout (seconds) to `future`.
pub(crate) async fn within<T>(
    timeout: Option<f64>,
    what: &str,
    future: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    match timeout {
        None => future.await,
        Some(seconds) => {
            let limit = Duration::try_from_secs_f64(seconds.max(0.0))
                .map_err(|e| Failure::Protocol(format!("timeout: {e}")))?;
            tokio::time::timeout(limit, future)
                .await
                .map_err(|_| Failure::TimedOut(format!("{what}: no answer within {seconds} s")))?
        }
    }
}

impl JobShared {
    /// Waits until `pick` finds its answer in the job's state.
    async fn wait_state<T>(
        &self,
        mut pick: impl FnMut(&JobState) -> Option<Result<T, Failure>>,
    ) -> Result<T, Failure> {
        let mut state = self.state.clone();
        loop {
            if let Some(answer) = pick(&state.borrow_and_update()) {
                return answer;
            }
            if state.changed().await.is_err() {
                return pick(&state.borrow()).unwrap_or_else(|| {
                    Err(Failure::ConnectionLost(
                        "the job's status stream ended".to_owned(),
                    ))
                });
            }
        }
    }

    /// The status at `index` of the history, `None` past the end of an ended job.
    async fn status_at(&self, index: usize) -> Result<Option<Status>, Failure> {
        self.wait_state(|state| match state.statuses.get(index) {
            Some(update) => Some(Ok(Some(Status::from(update)))),
            None => state.closed.clone().map(|closed| closed.map(|()| None)),
        })
        .await
    }

    /// The first status named `name`, or the failure the job ended with first.
    async fn wait_for_name(&self, name: String) -> Result<Status, Failure> {
        self.wait_state(|state| {
            if let Some(update) = state
                .statuses
                .iter()
                .find(|u| status_name(&u.status) == name)
            {
                return Some(Ok(Status::from(update)));
            }
            ended_failure(state)
        })
        .await
    }

    async fn endpoint(&self) -> Result<VerifiedEndpoint, Failure> {
        self.wait_state(|state| state.endpoint.clone().or_else(|| ended_failure(state)))
            .await
    }

    /// The final status when the job completed; its failure as an error otherwise.
    async fn end(&self) -> Result<Status, Failure> {
        self.wait_state(|state| {
            let last = state.statuses.last().filter(|u| u.status.is_terminal());
            match (last, &state.closed) {
                (Some(update), _) if matches!(update.status, JobStatus::Completed(_)) => {
                    Some(Ok(Status::from(update)))
                }
                (Some(update), _) => Some(Err(Failure::ended(&update.status))),
                (None, Some(Err(failure))) => Some(Err(failure.clone())),
                _ => None,
            }
        })
        .await
    }

    /// The QUIC connection to the job, made on first use (after the endpoint verified).
    pub(crate) async fn connection(&self) -> Result<Arc<JobConnection>, Failure> {
        self.connection
            .get_or_try_init(|| async {
                let endpoint = self.endpoint().await?;
                let key = self.client_key.clone().ok_or_else(|| {
                    Failure::Protocol(
                        "this handle has no client key for the job: attach with the job's \
                         client_key to reach its endpoint"
                            .to_owned(),
                    )
                })?;
                let connection = JobConnection::connect(self.job_id, key, &endpoint).await?;
                Ok(Arc::new(connection))
            })
            .await
            .cloned()
    }

    async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), Failure>>) -> Command,
    ) -> Result<(), Failure> {
        let (reply, answer) = oneshot::channel();
        let gone = || Failure::ConnectionLost("the job's actor has stopped".to_owned());
        self.inbox.send(make(reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn report(&self, receipt: Receipt, details: String) -> Result<String, Failure> {
        let endpoint = self.endpoint().await?;
        let receipt = Receipt::verified(receipt.signed, &endpoint.job_key())?;
        let evidence = ReportEvidence {
            job_id: self.job_id,
            endpoint: endpoint.signed.clone(),
            receipt: receipt.signed,
            request_digest: receipt.content.digest_in,
            response_digest: receipt.content.digest_out,
            trusted_receipt: None,
        };
        let report = self.client.sign_report(evidence, &details);
        let verdict = self.client.report(&report).await?;
        Ok(format!("{verdict:?}"))
    }
}

/// The failure a job that ended (or whose stream broke) is, when something else was awaited.
fn ended_failure<T>(state: &JobState) -> Option<Result<T, Failure>> {
    match &state.closed {
        None => None,
        Some(Err(failure)) => Some(Err(failure.clone())),
        Some(Ok(())) => Some(Err(state
            .statuses
            .last()
            .map(|u| Failure::ended(&u.status))
            .unwrap_or_else(|| Failure::Ended("no status".to_owned())))),
    }
}

impl Job {
    /// Starts the actor for `handle` and wraps it.
    pub(crate) fn start(handle: JobHandle, client: Client) -> PyResult<Self> {
        let (inbox, commands) = mpsc::channel(actor::INBOX);
        let (state_tx, state) = watch::channel(JobState::default());
        let shared = JobShared {
            job_id: handle.job_id(),
            client_key: handle.client_key().cloned(),
            client,
            state,
            inbox,
            connection: Arc::new(OnceCell::new()),
        };
        runtime()?.spawn(actor::run(handle, commands, state_tx));
        Ok(Self {
            shared,
            process: ProcessBound::here(),
        })
    }

    /// A clone of the shared part, after checking this process owns the job handle.
    fn shared(&self) -> PyResult<JobShared> {
        self.process.check("job handle")?;
        Ok(self.shared.clone())
    }
}

/// Writes `Job`'s `#[pymethods]` block: the plain methods given, and for each twin a blocking
/// method and its `_async` twin made from one future-making body (PyO3 reads the block after
/// this macro has expanded).
macro_rules! job_methods {
    (
        { $($plain:item)* }
        $( $(#[$doc:meta])* $name:ident, $name_async:ident,
           ($($arg:ident : $ty:ty $(= $default:expr)?),*), $out:ty, |$shared:ident| $body:expr; )*
    ) => {
        #[pymethods]
        impl Job {
            $($plain)*
            $(
                $(#[$doc])*
                #[pyo3(signature = ($($arg $(= $default)?),*))]
                fn $name(&self, py: Python<'_>, $($arg: $ty),*) -> PyResult<$out> {
                    let $shared = self.shared()?;
                    block_on(py, async move { Ok($body.await?) })
                }

                $(#[$doc])*
                #[pyo3(signature = ($($arg $(= $default)?),*))]
                fn $name_async<'py>(
                    &self,
                    py: Python<'py>,
                    $($arg: $ty),*
                ) -> PyResult<Bound<'py, PyAny>> {
                    let $shared = self.shared()?;
                    awaitable(py, async move { Ok::<$out, PyErr>($body.await?) })
                }
            )*
        }
    };
}

job_methods! {
    {
    /// The job id (32 hex digits).
    #[getter]
    fn job_id(&self) -> String {
        self.shared.job_id.to_string()
    }

    /// The per-job client key (keep it to attach again later and reach the endpoint); `None`
    /// for a handle attached without it.
    #[getter]
    fn client_key(&self) -> Option<Key> {
        self.shared.client_key.clone().map(|secret| Key { secret })
    }

    /// The statuses received so far.
    fn history(&self) -> Vec<Status> {
        self.shared.state.borrow().statuses.iter().map(Status::from).collect()
    }

    fn __repr__(&self) -> String {
        let state = self.shared.state.borrow();
        let last = state.statuses.last().map(|u| status_name(&u.status));
        format!("Job({}, {})", self.shared.job_id, last.as_deref().unwrap_or("submitted"))
    }
    }

        /// The status at `index` of the job's history, waiting for it; `None` once the job has
        /// ended and there is none.
        next_status, next_status_async, (index: usize, timeout: Option<f64> = None), Option<Status>,
        |shared| within(timeout, "next status", async move { shared.status_at(index).await });

        /// Waits for the first status of kind `name` (e.g. `"VolumesFetched"`).
        wait_for, wait_for_async, (name: String, timeout: Option<f64> = None), Status,
        |shared| within(timeout, "status", async move { shared.wait_for_name(name).await });

        /// Waits until the job serves and returns its endpoint record, verified against the
        /// assigned miner (a record that fails is refused with `IntegrityError`).
        wait_for_endpoint, wait_for_endpoint_async, (timeout: Option<f64> = None), Endpoint,
        |shared| within(timeout, "endpoint", async move {
            shared.endpoint().await.map(|e| Endpoint::from(&e))
        });

        /// Waits for the job's end: its final status when it completed; `RejectedError`,
        /// `JobFailedError` or `HordeFailedError` otherwise.
        wait, wait_async, (timeout: Option<f64> = None), Status,
        |shared| within(timeout, "job end", async move { shared.end().await });

        /// Asks for the job to end (signed with the account key).
        terminate, terminate_async, (), (),
        |shared| async move { shared.command(|reply| Command::Terminate { reply }).await };

        /// Sends a signed volume list given as TOML (`volume_msg_id`, `[[fetch]]`,
        /// `[[upload]]`, as for `horde job volumes`).
        send_volumes_toml, send_volumes_toml_async, (text: String), (),
        |shared| async move {
            let list = VolumeListFile::from_toml(&text)
                .map_err(|e| Failure::InvalidSpec(e.to_string()))?;
            shared
                .command(|reply| Command::Volumes {
                    volume_msg_id: list.volume_msg_id,
                    fetch: list.fetch,
                    upload: list.upload,
                    reply,
                })
                .await
        };

        /// Reports the job's miner for a wrong answer: `receipt` is the job's receipt for the
        /// disputed stream; returns the facilitator's verdict.
        report, report_async, (receipt: Receipt, details: String), String,
        |shared| async move { shared.report(receipt, details).await };

        /// One HTTP request through the job's tunnel: `(status, headers, body, receipt)` with the
        /// body's exact bytes and the job's verified receipt.
        request_raw, request_raw_async,
        (method: String, path: String, body: Vec<u8>, headers: Vec<(String, String)>, timeout: Option<f64> = None),
        http::Buffered,
        |shared| within(timeout, "request", async move {
            http::buffered(&shared, &method, &path, &body, &headers).await
        });

        /// One HTTP request whose response is read as it arrives (`ResponseStream`).
        stream, stream_async,
        (method: String, path: String, body: Vec<u8>, headers: Vec<(String, String)>),
        http::ResponseStream,
        |shared| async move { http::streamed(&shared, &method, &path, &body, &headers).await };

        /// Listens on 127.0.0.1:`port` (0: any free port) and tunnels every connection to the
        /// job: a local URL for any HTTP or WebSocket library.
        forward, forward_async, (port: u16 = 0), http::Forward,
        |shared| async move { http::forward(&shared, port).await };

        /// Closes the connection to the job (the job keeps running); requests on this handle
        /// fail afterwards (attach again for a new connection).
        close, close_async, (), (),
        |shared| async move {
            if let Some(connection) = shared.connection.get() {
                connection.close().await;
            }
            Ok::<(), Failure>(())
        };

}
