//! One job's life as the load bench drives it — submit, verified endpoint, one request through
//! the tunnel with its receipt verified, terminate, terminal status — and the two phases built
//! from it: jobs held open together, and a sustained stream of short jobs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use horde_node::client::{Client, JobConnection, JobHandle, JobRequest};
use horde_protocol::{JobId, JobStatus};
use horde_transport::tunnel::http_request;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// How long one job may take from submission to its verified request before it counts as hung
/// (the readiness deadline is 60 s; a healthy job takes well under a second).
const OPEN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long terminating a job may take until its terminal status arrives (the executor gives
/// the job a grace period and drains its endpoint for a few seconds at most).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// What became of one job.
#[derive(Debug, Clone)]
pub(crate) struct JobRun {
    /// The client (index) that submitted it.
    pub(crate) client: usize,
    pub(crate) job_id: Option<JobId>,
    /// Submit → verified endpoint, ms.
    pub(crate) endpoint_ms: Option<f64>,
    /// One `GET /health` through the tunnel on a new stream, until the receipt is verified, ms.
    pub(crate) request_ms: Option<f64>,
    /// Submit → terminal status, ms (for jobs terminated at once, the whole short job).
    pub(crate) total_ms: Option<f64>,
    /// The terminal status the client saw.
    pub(crate) end: Option<JobStatus>,
    /// Terminal statuses in the client's history (exactly one for a well-ended job).
    pub(crate) terminal_statuses: usize,
    /// What went wrong, if anything did.
    pub(crate) error: Option<String>,
}

impl JobRun {
    fn new(client: usize) -> Self {
        Self {
            client,
            job_id: None,
            endpoint_ms: None,
            request_ms: None,
            total_ms: None,
            end: None,
            terminal_statuses: 0,
            error: None,
        }
    }

    /// Whether it ended as the bench ends jobs: `Completed` after the client's terminate, with
    /// one terminal status and no error on the way.
    pub(crate) fn ended_as_expected(&self) -> bool {
        self.error.is_none() && self.terminal_statuses == 1 && is_terminated(self.end.as_ref())
    }
}

/// `Completed` because the client asked the job to end.
pub(crate) fn is_terminated(status: Option<&JobStatus>) -> bool {
    matches!(status, Some(JobStatus::Completed(finished)) if finished.terminated)
}

/// A short name for a status (no stdout tails).
pub(crate) fn status_name(status: &JobStatus) -> String {
    match status {
        JobStatus::Completed(finished) => format!(
            "Completed(terminated: {}, exit: {:?})",
            finished.terminated, finished.exit_code
        ),
        JobStatus::Rejected(reason) => format!("Rejected({reason:?})"),
        JobStatus::Failed(failure) => format!("Failed({:?}, {:?})", failure.stage, failure.reason),
        JobStatus::HordeFailed(failure) => {
            format!("HordeFailed({}: {})", failure.reported_by, failure.reason)
        }
        other => format!("not terminal: {other:?}"),
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// A job serving, with the client's connection to it.
struct OpenJob {
    handle: JobHandle,
    connection: JobConnection,
    submitted: Instant,
}

/// Submits, waits for the verified endpoint, connects and sends one request through the
/// tunnel (its receipt verified).
async fn open(client: &Client, request: &JobRequest, run: &mut JobRun) -> anyhow::Result<OpenJob> {
    let submitted = Instant::now();
    let mut handle = client.submit(request).await.context("submit")?;
    run.job_id = Some(handle.job_id());
    let endpoint = handle
        .wait_for_endpoint()
        .await
        .context("waiting for the endpoint")?;
    run.endpoint_ms = Some(ms(submitted.elapsed()));
    let connection = handle.connect_job(&endpoint).await.context("connect")?;
    let asked = Instant::now();
    let response = http_request(&connection.tunnel, "GET", "/health", b"")
        .await
        .context("tunnel request")?;
    anyhow::ensure!(response.status == 200, "status {}", response.status);
    // `http_request` returns only once the job's receipt verified against the pinned job key;
    // checked here once more, and that it is for this job.
    let receipt = response.receipt.verify_by(&endpoint.job_key())?;
    anyhow::ensure!(receipt.job_id == handle.job_id(), "receipt for another job");
    run.request_ms = Some(ms(asked.elapsed()));
    Ok(OpenJob {
        handle,
        connection,
        submitted,
    })
}

/// Closes the tunnel connection, terminates the job and waits for its terminal status.
async fn close(job: OpenJob, run: &mut JobRun) -> anyhow::Result<()> {
    let OpenJob {
        mut handle,
        connection,
        submitted,
    } = job;
    connection.close().await;
    handle.terminate().await.context("terminate")?;
    let end = handle.wait_for_end().await.context("waiting for the end")?;
    run.total_ms = Some(ms(submitted.elapsed()));
    run.terminal_statuses = handle
        .history()
        .iter()
        .filter(|update| update.status.is_terminal())
        .count();
    run.end = Some(end);
    Ok(())
}

async fn open_within(client: &Client, request: &JobRequest, run: &mut JobRun) -> Option<OpenJob> {
    match tokio::time::timeout(OPEN_TIMEOUT, open(client, request, run)).await {
        Ok(Ok(job)) => Some(job),
        Ok(Err(error)) => {
            run.error = Some(format!("{error:#}"));
            None
        }
        Err(_) => {
            run.error = Some(format!("hung: not serving within {OPEN_TIMEOUT:?}"));
            None
        }
    }
}

async fn close_within(job: OpenJob, run: &mut JobRun) {
    match tokio::time::timeout(CLOSE_TIMEOUT, close(job, run)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => run.error = Some(format!("{error:#}")),
        Err(_) => run.error = Some(format!("hung: no terminal status within {CLOSE_TIMEOUT:?}")),
    }
}

/// Waits out `interval` between submissions (none for a zero interval).
async fn pace(ticker: &mut Option<tokio::time::Interval>) {
    if let Some(ticker) = ticker {
        ticker.tick().await;
    }
}

fn ticker(rate: f64) -> Option<tokio::time::Interval> {
    (rate > 0.0).then(|| tokio::time::interval(Duration::from_secs_f64(1.0 / rate)))
}

/// Phase 1 while its jobs are open: release them with [`HeldJobs::release`].
pub(crate) struct HeldJobs {
    tasks: JoinSet<JobRun>,
    release: watch::Sender<bool>,
    /// Jobs serving (their request answered) and held.
    pub(crate) open: usize,
    /// From the first submission until the last job was serving or had failed.
    pub(crate) opening: Duration,
}

impl HeldJobs {
    /// Submits `jobs` jobs at `rate` per second (0: at once), spread round-robin over
    /// `clients`, and returns once every one is serving (and held) or has failed.
    pub(crate) async fn open(
        clients: &[Client],
        request: &JobRequest,
        jobs: usize,
        rate: f64,
    ) -> Self {
        let (release, released) = watch::channel(false);
        let (opened_tx, mut opened_rx) = mpsc::channel(jobs.max(1));
        let mut tasks = JoinSet::new();
        let mut ticker = ticker(rate);
        let started = Instant::now();
        for index in 0..jobs {
            pace(&mut ticker).await;
            let slot = index % clients.len();
            let (client, request) = (clients[slot].clone(), request.clone());
            let (opened_tx, mut released) = (opened_tx.clone(), released.clone());
            tasks.spawn(async move {
                let mut run = JobRun::new(slot);
                let job = open_within(&client, &request, &mut run).await;
                let _ = opened_tx.send(job.is_some()).await;
                // Held jobs keep their tasks: only the count of answers ends the wait below.
                drop(opened_tx);
                if let Some(job) = job {
                    if released.wait_for(|go| *go).await.is_err() {
                        run.error = Some("the bench stopped before the release".to_owned());
                    }
                    close_within(job, &mut run).await;
                }
                run
            });
        }
        drop(opened_tx);
        let mut open = 0;
        for _ in 0..jobs {
            match opened_rx.recv().await {
                Some(serving) => open += usize::from(serving),
                None => break,
            }
        }
        Self {
            tasks,
            release,
            open,
            opening: started.elapsed(),
        }
    }

    /// Terminates every held job and returns what became of all of them.
    pub(crate) async fn release(self) -> Vec<JobRun> {
        let Self { tasks, release, .. } = self;
        let _ = release.send(true);
        join_runs(tasks).await
    }
}

/// Every job task's run (a task that panicked counts as a failed job).
async fn join_runs(mut tasks: JoinSet<JobRun>) -> Vec<JobRun> {
    let mut runs = Vec::new();
    while let Some(run) = tasks.join_next().await {
        runs.push(run.unwrap_or_else(|error| {
            let mut run = JobRun::new(0);
            run.error = Some(format!("job task failed: {error}"));
            run
        }));
    }
    runs
}

/// Phase 2's outcome.
pub(crate) struct Sustained {
    pub(crate) runs: Vec<JobRun>,
    /// From the first submission to the last.
    pub(crate) submitting: Duration,
    /// From the first submission until the last job had ended.
    pub(crate) span: Duration,
    /// Most jobs between submission and end at one time.
    pub(crate) max_in_flight: usize,
    /// Jobs that ended as expected within the `secs` window.
    pub(crate) ended_in_window: usize,
}

/// Submits short jobs at `rate` per second for `secs`, round-robin over `clients`; each is
/// submitted, reached, asked once and terminated at once. Returns when all have ended.
pub(crate) async fn sustained(
    clients: &[Client],
    request: &JobRequest,
    secs: u64,
    rate: f64,
) -> Sustained {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let ended_in_window = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let mut ticker = ticker(rate);
    let started = Instant::now();
    let window = Duration::from_secs(secs);
    let mut index = 0;
    while started.elapsed() < window {
        pace(&mut ticker).await;
        let slot = index % clients.len();
        index += 1;
        let (client, request) = (clients[slot].clone(), request.clone());
        let (in_flight, max_in_flight) = (Arc::clone(&in_flight), Arc::clone(&max_in_flight));
        let ended_in_window = Arc::clone(&ended_in_window);
        tasks.spawn(async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            max_in_flight.fetch_max(now, Ordering::SeqCst);
            let mut run = JobRun::new(slot);
            if let Some(job) = open_within(&client, &request, &mut run).await {
                close_within(job, &mut run).await;
            }
            if run.ended_as_expected() && started.elapsed() <= window {
                ended_in_window.fetch_add(1, Ordering::SeqCst);
            }
            in_flight.fetch_sub(1, Ordering::SeqCst);
            run
        });
    }
    let submitting = started.elapsed();
    let runs = join_runs(tasks).await;
    Sustained {
        runs,
        submitting,
        span: started.elapsed(),
        max_in_flight: max_in_flight.load(Ordering::SeqCst),
        ended_in_window: ended_in_window.load(Ordering::SeqCst),
    }
}
