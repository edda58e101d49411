//! The executor role: runs one job at a time for its miner.
//!
//! Started by a miner with a one-time token in `HORDE_EXECUTOR_TOKEN`, it dials the miner,
//! registers on a stream it keeps open, and accepts job sessions from the miner on that same
//! connection. For each job it prepares `volume/` and `output/`, reports ready, verifies the
//! client-signed spec, fetches the initial volumes, starts the job through its class's runner
//! (see [`crate::server::executor::runner`]: a sandbox with `HORDE_JOB_PORT`, `HORDE_VOLUME_DIR`,
//! `HORDE_OUTPUT_DIR`, `HORDE_EXECUTOR_URL`), probes its readiness route through the runner's
//! dialer, generates the job keypair and serves the job endpoint
//! (`horde/job/1`, certificate = job key, the only client accepted = the spec's client key),
//! then handles volume lists, "outputs ready" notifications and termination until the job exits
//! or its execution deadline passes. At the end it uploads declared outputs and stdout/stderr and
//! reports the exit status with truncated copies of both logs.
//!
//! One job runs through stages, one function each: `prepare` → `start` → `readiness` →
//! `serve_endpoint` → `running` → `results`; the runner removes everything made for the job
//! whichever stage ends it. When the executor starts and after each job, the runner prepares
//! what the next job will need ([`Runner::prepare_next`]: the process runner's sandbox), off
//! that job's start path.
//!
//! Layout: `executor.rs` (registration and the stages), `executor/runner.rs` (+ `runner/`: how
//! a job is started and isolated), `executor/volumes.rs` (volumes fetched) and
//! `executor/volumes/upload.rs` (outputs uploaded), `executor/outputs.rs` (which outputs are
//! uploaded when: mid-session, at the end, the logs, the job's last message),
//! `executor/http.rs` (the readiness probe and the job's `POST /outputs`), `executor/disk.rs`
//! (what the job keeps on the node's disk, measured while it runs).

pub mod disk;
mod http;
mod outputs;
pub mod runner;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use horde_protocol::messages::{
    EndpointReady, ExecutorRegistration, FailureReason, InitialJobDetails, JobFailure, JobFinished,
    OutputRef,
};
use horde_protocol::{
    ControlMessage, DownMessage, Hotkey, JobSpec, Program, SecretKey, Stage, UpMessage, UploadSpec,
};
use horde_transport::{
    ALPN_CONTROL, ALPN_JOB, ClientPolicy, EndpointConfig, HordeEndpoint, JobSession, accept_stream,
    codes, split,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::server::config::ExecutorConfig;
use crate::server::{EXECUTOR_TOKEN_ENV, cleanup};
use runner::{JobEvent, JobExit, JobProcess, Launch, Runner};
use volumes::HttpClient;

/// How far past the job's execution deadline the job endpoint may drain its streams: the
/// validator allows [`crate::validator::STAGE_SLACK`] (2 s) beyond the deadline for the
/// results, and the upload and the report need the rest.
const DRAIN_PAST_DEADLINE: Duration = Duration::from_secs(1);

/// Readiness probing waits between probes a tenth of the time waited so far, within
/// [`PROBE_INTERVAL_MIN`] and [`PROBE_INTERVAL_MAX`] ([`probe_interval`]): a job is seen at most
/// 10 % (and 1 ms) after it is up, a slow one is not hammered. (Doubling the wait, as before,
/// saw a job up at 33 ms only at 63 ms.)
const PROBE_INTERVAL_MIN: Duration = Duration::from_millis(1);
/// The longest wait between two readiness probes.
const PROBE_INTERVAL_MAX: Duration = Duration::from_millis(50);

/// The wait before the next readiness probe, `waited` after the first.
fn probe_interval(waited: Duration) -> Duration {
    (waited / 10).clamp(PROBE_INTERVAL_MIN, PROBE_INTERVAL_MAX)
}
/// Bytes of stdout/stderr copied into the job's result.
const LOG_TAIL_BYTES: u64 = 4096;
/// After SIGTERM, how long the job has to exit before SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(3);
/// Extra time on the executor's clock for the miner to send the full spec after readiness.
const DETAILS_SLACK: Duration = Duration::from_secs(2);
/// Pending "outputs ready" notifications.
const OUTPUTS_QUEUE: usize = 8;
/// Least room on the executor's disk for a job to start: a job started on a full disk dies at
/// its first write to stdout, with nothing in its logs to say why.
const MIN_FREE_BYTES: u64 = 64 << 20;

/// An executor that cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecutorError {
    /// No registration token in the environment: executors are started by miners.
    #[error("{EXECUTOR_TOKEN_ENV} is missing or malformed; executors are started by a miner")]
    NoToken,
    /// The miner could not be reached.
    #[error("miner unreachable: {0}")]
    Miner(String),
}

/// Registers with the miner and runs its jobs until the miner connection ends or `cancel` fires.
pub async fn run(
    endpoint: Arc<HordeEndpoint>,
    config: ExecutorConfig,
    data_dir: PathBuf,
    cancel: CancellationToken,
) -> Result<(), ExecutorError> {
    let token = std::env::var(EXECUTOR_TOKEN_ENV).map_err(|_| ExecutorError::NoToken)?;
    let mut token_bytes = [0u8; 16];
    hex::decode_to_slice(token.trim(), &mut token_bytes).map_err(|_| ExecutorError::NoToken)?;
    let connection = endpoint
        .connect_node(&config.miner, ALPN_CONTROL)
        .await
        .map_err(|error| ExecutorError::Miner(error.to_string()))?;
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| ExecutorError::Miner(e.to_string()))?;
    let (mut registration, _registration_recv) = split(send, recv);
    registration
        .send(&ControlMessage::RegisterExecutor(ExecutorRegistration {
            class: config.class.clone(),
            token: token_bytes,
        }))
        .await
        .map_err(|e| ExecutorError::Miner(e.to_string()))?;
    info!(miner = %config.miner.hotkey, class = %config.class, "registered with miner");
    let runner = match runner::select(&config.policy, &data_dir).await {
        Ok(runner) => Ok(runner),
        Err(error) => {
            warn!(%error, "this executor refuses every job");
            Err(error.to_string())
        }
    };
    // The first job's sandbox is made now, not when it arrives.
    if let Ok(runner) = &runner {
        runner.prepare_next(&data_dir.join("jobs"));
    }
    let runner = JobRunner {
        endpoint,
        config,
        data_dir,
        http: HttpClient::default(),
        runner,
    };
    loop {
        let accepted = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            accepted = accept_stream(&connection) => accepted,
        };
        match accepted {
            Ok(Some((send, recv, ControlMessage::Down(DownMessage::InitialDetails(details))))) => {
                let session = JobSession::new(details.job_id, config_miner(&runner), send, recv);
                let span = info_span!("job", job = %details.job_id.fmt_short());
                runner
                    .run_job(session, details, &cancel)
                    .instrument(span)
                    .await;
            }
            Ok(Some((mut send, mut recv, other))) => {
                warn!(message = ?other, "unexpected first message from miner");
                recv.stop(codes::PROTOCOL_VIOLATION);
                send.reset(codes::PROTOCOL_VIOLATION);
            }
            Ok(None) => {
                info!("miner connection closed; executor exits");
                break;
            }
            Err(error) => {
                if let Some(reason) = connection.close_reason() {
                    info!(%reason, "miner connection lost; executor exits");
                    break;
                }
                debug!(%error, "miner stream failed");
            }
        }
    }
    Ok(())
}

fn config_miner(runner: &JobRunner) -> Hotkey {
    runner.config.miner.hotkey
}

#[derive(Debug)]
struct JobRunner {
    endpoint: Arc<HordeEndpoint>,
    config: ExecutorConfig,
    data_dir: PathBuf,
    http: HttpClient,
    /// The runner of this executor's class, or why this host cannot run its jobs.
    runner: Result<Arc<dyn Runner>, String>,
}

/// How a job's run ended, before uploads.
#[derive(Debug)]
enum Ending {
    /// The process exited by itself.
    Exited(JobExit),
    /// The client asked for termination.
    Terminated(JobExit),
    /// The execution deadline passed.
    TimedOut,
    /// The miner's session went away: nobody to report to.
    Abandoned,
}

/// A stage's end: `Some` message for the miner, or `None` when there is nobody to tell.
type Outcome = Option<UpMessage>;

/// What the first stage leaves for the others: the verified spec, its owner, the volume names
/// already used.
#[derive(Debug)]
struct Prepared {
    spec: JobSpec,
    owner: Hotkey,
    used_paths: HashSet<String>,
    job_dir: PathBuf,
    /// Uploads asked for mid-session that failed: reported again in the job's last message.
    not_uploaded: Vec<OutputRef>,
    /// What the job's declared outputs may still send, mid-session and at the end together.
    output_budget: volumes::OutputBudget,
    /// The spec's declared outputs the job announced mid-session, as they were uploaded then:
    /// at the job's end each is sent again only if it changed since.
    sent: HashMap<String, OutputRef>,
}

/// The job's "outputs ready" requests: each connection read on a task of its own (aborted with
/// the set), its notification queued for the running stage.
#[derive(Debug)]
struct OutputsRequests {
    notify: mpsc::Sender<http::OutputsReady>,
    ready: mpsc::Receiver<http::OutputsReady>,
    requests: tokio::task::JoinSet<()>,
}

impl OutputsRequests {
    fn new() -> Self {
        let (notify, ready) = mpsc::channel(OUTPUTS_QUEUE);
        Self {
            notify,
            ready,
            requests: tokio::task::JoinSet::new(),
        }
    }

    fn serve(&mut self, stream: tokio::net::TcpStream) {
        let notify = self.notify.clone();
        self.requests.spawn(
            async move {
                // A broken request is the job's own problem: it gets no answer.
                let _ = http::handle_outputs(stream, notify).await;
            }
            .in_current_span(),
        );
    }
}

/// What the executor watches of a started job besides its process.
#[derive(Debug)]
struct Watched {
    /// Its `POST /outputs` requests.
    outputs: OutputsRequests,
    /// What it keeps on the node's disk.
    disk: disk::DiskWatch,
}

/// Why the job did not become ready, short of the readiness deadline.
#[derive(Debug)]
enum NotReady {
    /// It ended (or the runner lost it).
    Exited(std::io::Result<JobExit>),
    /// It kept more on the node's disk than its class allows.
    OverDisk(String),
}

/// The job endpoint while it serves.
#[derive(Debug)]
struct Serving {
    tunnel: horde_transport::tunnel::JobEndpointHandle,
    cancel: CancellationToken,
}

fn failed(stage: Stage, reason: FailureReason, result: Option<JobFinished>) -> UpMessage {
    UpMessage::Failed(JobFailure {
        stage,
        reason,
        result,
    })
}

fn exit_code_reason(exit: &JobExit) -> FailureReason {
    if exit.out_of_memory {
        return FailureReason::OutOfMemory;
    }
    match (exit.code, exit.signal) {
        (Some(code), _) => FailureReason::NonZeroExit(code),
        (None, Some(signal)) => FailureReason::Signal(signal),
        (None, None) => FailureReason::NonZeroExit(-1),
    }
}

/// Bytes an unprivileged writer may still use on the filesystem of `dir`; `None` when it cannot
/// be asked.
fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

impl JobRunner {
    async fn run_job(
        &self,
        mut session: JobSession,
        details: InitialJobDetails,
        cancel: &CancellationToken,
    ) {
        let job_dir = self.data_dir.join("jobs").join(details.job_id.to_string());
        let outcome = self
            .run_job_inner(&mut session, &details, &job_dir, cancel)
            .await;
        if let Some(message) = outcome
            && let Err(error) = session.send_up(&message).await
        {
            warn!(%error, "could not report the job's end to the miner");
        }
        let _ = session.finish();
        if let Err(error) = cleanup::remove_left_behind(job_dir.clone()).await {
            warn!(%error, dir = %job_dir.display(), "could not remove the job's directory");
        }
        // The next job's sandbox, made while no job waits for it.
        if let Ok(runner) = &self.runner {
            runner.prepare_next(&self.data_dir.join("jobs"));
        }
        info!("job over");
    }

    /// prepare → start → readiness → endpoint → running → results; the job's runner is
    /// removed (with everything made for the job) whatever stage ends it.
    async fn run_job_inner(
        &self,
        session: &mut JobSession,
        details: &InitialJobDetails,
        job_dir: &Path,
        cancel: &CancellationToken,
    ) -> Outcome {
        let mut prepared = match self.prepare(session, details, job_dir).await {
            Ok(prepared) => prepared,
            Err(outcome) => return outcome,
        };
        let mut job = match self.start(&prepared.spec, job_dir).await {
            Ok(job) => job,
            Err(outcome) => return outcome,
        };
        let outcome = self
            .run_started(session, &mut prepared, job.as_mut(), job_dir, cancel)
            .await;
        job.remove().await;
        outcome
    }

    async fn run_started(
        &self,
        session: &mut JobSession,
        prepared: &mut Prepared,
        job: &mut dyn JobProcess,
        job_dir: &Path,
        cancel: &CancellationToken,
    ) -> Outcome {
        let spec = &prepared.spec;
        let policy = &self.config.policy;
        let limits = disk::DiskLimits {
            bytes: policy.disk_limit(),
            files: disk::MAX_JOB_FILES,
        };
        let roots = vec![job_dir.join("output"), job_dir.join("logs/output")];
        let processes = job
            .pid()
            .and_then(|pid| disk::JobProcesses::of(pid, &job_dir.join("output")));
        let mut watched = Watched {
            outputs: OutputsRequests::new(),
            disk: disk::DiskWatch::start(roots, processes, limits),
        };
        let readiness = self.readiness(job, spec, job_dir, &mut watched);
        if let Err(outcome) = readiness.await {
            return outcome;
        }
        let serving = match self
            .serve_endpoint(session, job, spec, job_dir, cancel)
            .await
        {
            Ok(serving) => serving,
            Err(outcome) => return outcome,
        };
        let execution = tokio::time::sleep(Duration::from_millis(spec.deadlines.execution_ms));
        tokio::pin!(execution);
        let ending = match self
            .running(
                session,
                prepared,
                job,
                cancel,
                execution.as_mut(),
                &mut watched,
            )
            .await
        {
            Ok(ending) => ending,
            Err(outcome) => {
                serving.cancel.cancel();
                return outcome;
            }
        };
        // Nothing of the job runs any more: nothing to measure or to answer.
        drop(watched);
        // The job has ended or was terminated: replies it wrote before that still reach the
        // client with their receipts — within the execution deadline plus a second, so the
        // results still reach the validator inside its stage slack. Out of time or abandoned
        // (the miner is gone): closed at once.
        let (served, failed_streams) = match ending {
            Ending::Exited(_) | Ending::Terminated(_) => {
                let left = execution
                    .deadline()
                    .saturating_duration_since(tokio::time::Instant::now());
                let grace = horde_transport::tunnel::DRAIN_GRACE.min(left + DRAIN_PAST_DEADLINE);
                serving.tunnel.drain(grace).await
            }
            Ending::TimedOut | Ending::Abandoned => serving.tunnel.shutdown().await,
        };
        info!(served, failed = failed_streams, "job endpoint closed");
        let not_uploaded = std::mem::take(&mut prepared.not_uploaded);
        let sent = std::mem::take(&mut prepared.sent);
        let budget = &mut prepared.output_budget;
        self.results(&prepared.spec, job_dir, ending, not_uploaded, sent, budget)
            .await
    }

    /// Prepares the job directory, reports ready, receives and verifies the full spec, fetches
    /// the initial volumes.
    async fn prepare(
        &self,
        session: &mut JobSession,
        details: &InitialJobDetails,
        job_dir: &Path,
    ) -> Result<Prepared, Outcome> {
        let startup = |reason: String| {
            Some(failed(
                Stage::ExecutorStartup,
                FailureReason::Spawn(reason),
                None,
            ))
        };
        if let Err(error) = cleanup::remove_tree(job_dir) {
            return Err(startup(format!(
                "removing an earlier job directory: {error}"
            )));
        }
        if let Some(free) = free_bytes(&self.data_dir)
            && free < MIN_FREE_BYTES
        {
            return Err(startup(format!(
                "the miner's disk is full: {free} bytes free for the job's files in {} (a job \
                 starts with at least {MIN_FREE_BYTES})",
                self.data_dir.display()
            )));
        }
        for dir in ["volume", "output", "logs/output"] {
            if let Err(error) = std::fs::create_dir_all(job_dir.join(dir)) {
                return Err(startup(format!("preparing job directory: {error}")));
            }
        }
        if let Program::Image { reference } = &details.program
            && self.config.policy.runtime != runner::Runtime::Container
        {
            return Err(startup(format!(
                "image {reference}: this executor runs commands, not container images"
            )));
        }
        if let Err(reason) = &self.runner {
            return Err(startup(reason.clone()));
        }
        if session.send_up(&UpMessage::ExecutorReady).await.is_err() {
            return Err(None);
        }

        // The full spec.
        let wait = Duration::from_millis(details.deadlines.executor_startup_ms) + DETAILS_SLACK;
        let signed = match tokio::time::timeout(wait, session.recv()).await {
            Err(_) => {
                return Err(Some(failed(
                    Stage::ExecutorStartup,
                    FailureReason::Timeout,
                    None,
                )));
            }
            Ok(Ok(Some(ControlMessage::Down(DownMessage::FullDetails(full))))) => full.spec,
            Ok(Ok(Some(ControlMessage::Down(DownMessage::Terminate(_)))))
            | Ok(Ok(None))
            | Ok(Err(_)) => return Err(None),
            Ok(Ok(Some(other))) => {
                warn!(message = ?other, "expected the full job details");
                return Err(None);
            }
        };
        let owner = *signed.signer();
        let spec = match signed.verify() {
            Ok(spec) if spec.job_id == details.job_id && spec.client_key == details.client_key => {
                spec
            }
            Ok(_) => {
                return Err(startup(
                    "full details disagree with the initial details".into(),
                ));
            }
            Err(error) => return Err(startup(format!("client signature: {error}"))),
        };

        // Initial volumes.
        let mut used_paths: HashSet<String> = HashSet::new();
        if let Err(reason) = self
            .fetch_volumes(
                job_dir,
                &spec.volumes,
                &mut used_paths,
                spec.deadlines.volume_download_ms,
            )
            .await
        {
            return Err(Some(failed(Stage::VolumeDownload, reason, None)));
        }
        Ok(Prepared {
            spec,
            owner,
            used_paths,
            job_dir: job_dir.to_path_buf(),
            not_uploaded: Vec::new(),
            output_budget: volumes::OutputBudget::new(self.config.policy.output_limit()),
            sent: HashMap::new(),
        })
    }

    /// Starts the job through the class's runner.
    async fn start(&self, spec: &JobSpec, job_dir: &Path) -> Result<Box<dyn JobProcess>, Outcome> {
        let startup = |reason: String| {
            Some(failed(
                Stage::ExecutorStartup,
                FailureReason::Spawn(reason),
                None,
            ))
        };
        let runner = self
            .runner
            .as_ref()
            .map_err(|reason| startup(reason.clone()))?;
        let launch = Launch {
            job_id: spec.job_id,
            program: spec.program.clone(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            job_dir: job_dir.to_path_buf(),
            port: runner::DEFAULT_JOB_PORT,
            policy: self.config.policy.clone(),
        };
        let started = std::time::Instant::now();
        // Pulling or loading an image belongs to the start-up stage: bounded by its deadline.
        let limit = Duration::from_millis(spec.deadlines.executor_startup_ms);
        match tokio::time::timeout(limit, runner.start(launch)).await {
            Ok(Ok(job)) => {
                info!(elapsed = ?started.elapsed(), "job started");
                Ok(job)
            }
            Ok(Err(error)) => Err(startup(error.to_string())),
            Err(_) => Err(Some(failed(
                Stage::ExecutorStartup,
                FailureReason::Timeout,
                None,
            ))),
        }
    }

    /// Probes the job's readiness route through its dialer until it answers or the readiness
    /// deadline passes.
    async fn readiness(
        &self,
        job: &mut dyn JobProcess,
        spec: &JobSpec,
        job_dir: &Path,
        watched: &mut Watched,
    ) -> Result<(), Outcome> {
        let dialer = job.dialer();
        let readiness_limit = Duration::from_millis(spec.deadlines.readiness_ms);
        let ready = tokio::time::timeout(readiness_limit, async {
            let probing = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    biased;
                    why = watched.disk.exceeded() => return Err(NotReady::OverDisk(why)),
                    event = job.next_event() => match event {
                        JobEvent::Exited(exit) => return Err(NotReady::Exited(exit)),
                        // Served from the start, as the running stage will.
                        JobEvent::Outputs(stream) => {
                            watched.outputs.serve(stream);
                            continue;
                        }
                    },
                    ready = http::probe(dialer.as_ref(), &spec.readiness) => if ready {
                        return Ok(());
                    },
                }
                tokio::time::sleep(probe_interval(probing.elapsed())).await;
            }
        })
        .await;
        match ready {
            Ok(Ok(())) => Ok(()),
            Ok(Err(NotReady::Exited(Ok(exit)))) => {
                let result = self.finish_logs(job_dir, spec, Some(exit), false).await;
                let reason = exit_code_reason(&exit);
                Err(Some(failed(Stage::Readiness, reason, Some(result))))
            }
            // The runner cannot say how the job ended (its engine went away).
            Ok(Err(NotReady::Exited(Err(error)))) => {
                warn!(%error, "lost the job");
                let reason = FailureReason::Lost(error.to_string());
                Err(Some(
                    self.stopped(job, spec, job_dir, Stage::Readiness, reason)
                        .await,
                ))
            }
            Ok(Err(NotReady::OverDisk(why))) => Err(Some(
                self.over_disk(job, spec, job_dir, Stage::Readiness, why)
                    .await,
            )),
            Err(_) => {
                let reason = FailureReason::Timeout;
                Err(Some(
                    self.stopped(job, spec, job_dir, Stage::Readiness, reason)
                        .await,
                ))
            }
        }
    }

    /// Stops the job (SIGTERM, [`TERMINATE_GRACE`], SIGKILL) and builds its failure in `stage`
    /// for `reason`, with its logs.
    async fn stopped(
        &self,
        job: &mut dyn JobProcess,
        spec: &JobSpec,
        job_dir: &Path,
        stage: Stage,
        reason: FailureReason,
    ) -> UpMessage {
        self.stopped_within(TERMINATE_GRACE, job, spec, job_dir, stage, reason)
            .await
    }

    /// Kills the job at once, it being over its disk limit (`why`): a grace period would be
    /// more time to write. Its failure in `stage`, with its logs.
    async fn over_disk(
        &self,
        job: &mut dyn JobProcess,
        spec: &JobSpec,
        job_dir: &Path,
        stage: Stage,
        why: String,
    ) -> UpMessage {
        warn!(%why, "the job is over its disk limit; killing it");
        let reason = FailureReason::OverDiskLimit(why);
        self.stopped_within(Duration::ZERO, job, spec, job_dir, stage, reason)
            .await
    }

    async fn stopped_within(
        &self,
        grace: Duration,
        job: &mut dyn JobProcess,
        spec: &JobSpec,
        job_dir: &Path,
        stage: Stage,
        reason: FailureReason,
    ) -> UpMessage {
        let exit = job.stop(grace).await;
        let result = self.finish_logs(job_dir, spec, exit, true).await;
        failed(stage, reason, Some(result))
    }

    /// Generates the job key, serves the job endpoint and reports it up.
    async fn serve_endpoint(
        &self,
        session: &mut JobSession,
        job: &mut dyn JobProcess,
        spec: &JobSpec,
        job_dir: &Path,
        cancel: &CancellationToken,
    ) -> Result<Serving, Outcome> {
        let job_key = SecretKey::generate();
        let bind: SocketAddr = (self.config.job_host, 0).into();
        let tunnel_cancel = cancel.child_token();
        // On a thread of its own: every hop of a round trip through the tunnel stays on it
        // (see `serve_job_endpoint_on_own_thread`).
        let served = horde_transport::tunnel::serve_job_endpoint_on_own_thread(
            &job_key,
            EndpointConfig::new(bind, &[ALPN_JOB])
                .with_client_policy(ClientPolicy::Only(spec.client_key))
                // Every connection comes from the spec's one client key: a per-key share
                // would only shrink the endpoint's own cap.
                .with_max_connections_per_peer(horde_transport::DEFAULT_MAX_CONNECTIONS),
            Arc::new(horde_transport::tunnel::TunnelContext {
                job_id: spec.job_id,
                job_key: job_key.clone(),
                client_key: spec.client_key,
                target: job.dialer(),
            }),
            tunnel_cancel.clone(),
        )
        .map_err(|e| e.to_string())
        .and_then(|tunnel| {
            let address = tunnel
                .local_addr()
                .ok_or_else(|| "the job endpoint has no local address".to_owned())?;
            Ok((tunnel, address))
        });
        let (tunnel, address) = match served {
            Ok(served) => served,
            Err(error) => {
                let reason = FailureReason::Spawn(error);
                return Err(Some(
                    self.stopped(job, spec, job_dir, Stage::Readiness, reason)
                        .await,
                ));
            }
        };
        info!(%address, job_key = %job_key.hotkey().fmt_short(), "job endpoint serving");
        if session
            .send_up(&UpMessage::EndpointReady(EndpointReady {
                address,
                job_key: job_key.hotkey(),
            }))
            .await
            .is_err()
        {
            job.stop(TERMINATE_GRACE).await;
            tunnel_cancel.cancel();
            return Err(None);
        }
        Ok(Serving {
            tunnel,
            cancel: tunnel_cancel,
        })
    }

    /// The running job: volume lists, "outputs ready" notifications and termination, until the
    /// job exits, the execution deadline passes or the miner goes away.
    async fn running(
        &self,
        session: &mut JobSession,
        prepared: &mut Prepared,
        job: &mut dyn JobProcess,
        cancel: &CancellationToken,
        mut execution: std::pin::Pin<&mut tokio::time::Sleep>,
        watched: &mut Watched,
    ) -> Result<Ending, Outcome> {
        let Prepared {
            spec,
            owner,
            used_paths,
            job_dir,
            not_uploaded,
            output_budget,
            sent,
        } = prepared;
        let job_dir = job_dir.as_path();
        let mut pending_uploads: HashMap<String, (UploadSpec, Option<u64>)> = spec
            .uploads
            .iter()
            .map(|u| (u.path.0.clone(), (u.clone(), None)))
            .collect();
        let ending = 'running: loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break Ending::Abandoned,
                // Before the job's exit: a job that went over and exited is still stopped for it.
                why = watched.disk.exceeded() => {
                    return Err(Some(self.over_disk(job, spec, job_dir, Stage::Execution, why).await));
                }
                event = job.next_event() => match event {
                    JobEvent::Exited(Ok(exit)) => return Ok(Ending::Exited(exit)),
                    // The runner cannot say how the job ended (its engine went away): stop
                    // what can be stopped, and say so.
                    JobEvent::Exited(Err(error)) => {
                        warn!(%error, "lost the job");
                        let reason = FailureReason::Lost(error.to_string());
                        return Err(Some(self.stopped(job, spec, job_dir, Stage::Execution, reason).await));
                    }
                    JobEvent::Outputs(stream) => {
                        watched.outputs.serve(stream);
                    }
                },
                () = &mut execution => {
                    info!("execution deadline passed; stopping the job");
                    job.stop(TERMINATE_GRACE).await;
                    return Ok(Ending::TimedOut);
                }
                message = session.recv() => match message {
                    Ok(Some(ControlMessage::Down(DownMessage::Volumes(list)))) => {
                        let list = match list.verify_by(owner) {
                            Ok(list) if list.job_id == spec.job_id => list,
                            _ => {
                                warn!("volume list not signed by the job's owner; ignored");
                                continue;
                            }
                        };
                        for upload in &list.upload {
                            pending_uploads.insert(upload.path.0.clone(), (upload.clone(), Some(list.volume_msg_id)));
                        }
                        let fetch = self.fetch_volumes(job_dir, &list.fetch, used_paths, spec.deadlines.volume_download_ms);
                        let fetched = match watched.disk.unless_over(fetch).await {
                            Ok(fetched) => fetched,
                            Err(why) => {
                                return Err(Some(self.over_disk(job, spec, job_dir, Stage::Execution, why).await));
                            }
                        };
                        match fetched {
                            Ok(()) => {
                                if session.send_up(&UpMessage::VolumesFetched { volume_msg_id: list.volume_msg_id }).await.is_err() {
                                    break Ending::Abandoned;
                                }
                            }
                            Err(reason) => {
                                warn!(?reason, "mid-session volume fetch failed");
                                return Err(Some(self.stopped(job, spec, job_dir, Stage::VolumeDownload, reason).await));
                            }
                        }
                    }
                    Ok(Some(ControlMessage::Down(DownMessage::Terminate(request)))) => {
                        if request.verify_by(owner).is_ok_and(|r| r.job_id == spec.job_id) {
                            info!("terminate requested by the client");
                            return Ok(match job.stop(TERMINATE_GRACE).await {
                                Some(exit) => Ending::Terminated(exit),
                                None => Ending::Abandoned,
                            });
                        }
                        warn!("terminate not signed by the job's owner; ignored");
                    }
                    Ok(Some(other)) => warn!(message = ?other, "unexpected message from miner"),
                    Ok(None) | Err(_) => {
                        info!("miner ended the job session; stopping the job");
                        break Ending::Abandoned;
                    }
                },
                Some(_) = watched.outputs.requests.join_next(), if !watched.outputs.requests.is_empty() => {}
                Some(ready) = watched.outputs.ready.recv() => {
                    let upload = self.upload_ready(job_dir, &ready.paths, &mut pending_uploads, not_uploaded, sent, output_budget);
                    let (messages, reply) = match watched.disk.unless_over(upload).await {
                        Ok(uploaded) => uploaded,
                        Err(why) => {
                            return Err(Some(self.over_disk(job, spec, job_dir, Stage::Execution, why).await));
                        }
                    };
                    let _ = ready.reply.send(reply);
                    for message in &messages {
                        if session.send_up(message).await.is_err() {
                            break 'running Ending::Abandoned;
                        }
                    }
                }
            }
        };
        job.stop(TERMINATE_GRACE).await;
        Ok(ending)
    }

    async fn fetch_volumes(
        &self,
        job_dir: &Path,
        fetch: &[horde_protocol::VolumeSpec],
        used_paths: &mut HashSet<String>,
        limit_ms: u64,
    ) -> Result<(), FailureReason> {
        if fetch.is_empty() {
            return Ok(());
        }
        for volume in fetch {
            if used_paths.contains(&volume.path.0) {
                return Err(FailureReason::VolumeFetch(format!(
                    "{}: file names must be unique within a job",
                    volume.path
                )));
            }
        }
        let limit = Duration::from_millis(limit_ms);
        match tokio::time::timeout(
            limit,
            volumes::materialize(job_dir, fetch, &self.endpoint, &self.http),
        )
        .await
        {
            Ok(Ok(placed)) => {
                used_paths.extend(fetch.iter().map(|v| v.path.0.clone()));
                debug!(files = placed.len(), "volumes fetched");
                Ok(())
            }
            Ok(Err(error)) => Err(FailureReason::VolumeFetch(error.to_string())),
            Err(_) => Err(FailureReason::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_probes_lag_a_tenth_of_the_wait() {
        assert_eq!(probe_interval(Duration::ZERO), PROBE_INTERVAL_MIN);
        assert_eq!(
            probe_interval(Duration::from_millis(30)),
            Duration::from_millis(3)
        );
        assert_eq!(probe_interval(Duration::from_secs(60)), PROBE_INTERVAL_MAX);
        // A job up at any time is probed again within a tenth of that time (and 1 ms).
        let mut probed = Duration::ZERO;
        for up in (0..2000).map(Duration::from_millis) {
            while probed < up {
                probed += probe_interval(probed);
            }
            assert!(
                probed - up <= (up / 10).max(PROBE_INTERVAL_MIN),
                "up at {up:?}, seen at {probed:?}"
            );
        }
    }
}
