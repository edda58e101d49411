//! `horde job …`: the client's command line over [`crate::client`].
//!
//! `run` submits a job spec (TOML) and prints each pushed status; the job's per-job client key,
//! facilitator and verified endpoint record are kept in a state directory (mode 0600 files) so
//! that `request`, `forward`, `volumes`, `terminate` and `status` can act on the job later by id.
//! `request` and `forward` append each verified job receipt (hex) to `jobs/<job>.receipts`;
//! `report` turns one of them, with the stored endpoint record, into a signed miner report.
//!
//! Layout: `job.rs` (the commands), `job/request.rs` (`request`: the body streamed, exact bytes).

pub mod request;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, bail};
use horde_protocol::codec::{from_bytes_exact, to_bytes};
use horde_protocol::messages::{ReportVerdict, StatusUpdate};
use horde_protocol::{EndpointRecord, JobId, JobReceipt, JobStatus, NodeAddr, SecretKey, Signed};
use serde::{Deserialize, Serialize};

use crate::cli::{CommandFailed, EXIT_NOT_UPLOADED};
use crate::client::describe::status as describe;
use crate::client::spec::VolumeListFile;
use crate::client::{Client, JobConnection, JobRequest, ReportEvidence, VerifiedEndpoint};
use crate::clock::now;

/// How long the status stream must be quiet before the replayed history is taken as complete.
const HISTORY_IDLE: std::time::Duration = std::time::Duration::from_millis(300);

/// `horde job` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// Submit a job spec, stream its statuses, print the verified endpoint.
    Run {
        /// The job spec (TOML).
        #[arg(long)]
        spec: PathBuf,
        /// Keep following statuses until the job ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        common: JobStateArgs,
    },
    /// Print a job's status history (and follow it with --follow).
    Status {
        /// The job id.
        job: String,
        /// Keep following until the job ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        common: JobStateArgs,
    },
    /// Send one HTTP request to the job through a tunnel stream and verify the job's receipt.
    /// The body's exact bytes go to stdout (or -o FILE), streamed; the head goes to stderr
    /// (or, with -i, to stdout before the body).
    Request(request::RequestArgs),
    /// Tunnel a local TCP port to the job (curl, browsers and WebSocket clients work unchanged).
    Forward {
        /// The job id.
        job: String,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[command(flatten)]
        common: JobStateArgs,
    },
    /// Send a volume list (TOML) to the job and wait until it is fetched.
    Volumes {
        /// The job id.
        job: String,
        /// The volume list.
        #[arg(long)]
        spec: PathBuf,
        #[command(flatten)]
        common: JobStateArgs,
    },
    /// End the job and print its result.
    Terminate {
        /// The job id.
        job: String,
        #[command(flatten)]
        common: JobStateArgs,
    },
    /// Report the job's miner for a wrong answer: signs a miner report with the account key
    /// (the job's owner) from the stored endpoint record and a receipt, and prints the verdict.
    Report(ReportArgs),
}

/// `horde job report` options.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The job id.
    job: String,
    /// The disputed receipt, hex as stored in `jobs/<job>.receipts` (default: the last one).
    #[arg(long)]
    receipt: Option<String>,
    /// What was wrong.
    #[arg(long)]
    details: String,
    /// BLAKE3 (hex) of the request (default: the receipt's digest of the bytes sent).
    #[arg(long)]
    request_digest: Option<String>,
    /// BLAKE3 (hex) of the response (default: the receipt's digest of the bytes returned).
    #[arg(long)]
    response_digest: Option<String>,
    /// The trusted job's receipt for the same request (hex).
    #[arg(long)]
    trusted_receipt: Option<String>,
    #[command(flatten)]
    common: JobStateArgs,
}

/// Options every job command takes.
#[derive(Debug, clap::Args)]
pub struct JobStateArgs {
    /// The facilitator, `HOTKEY@IP:PORT` (remembered per job after `run`).
    #[arg(long, env = "HORDE_FACILITATOR")]
    facilitator: Option<String>,
    /// The account key file (created on first use).
    #[arg(long, env = "HORDE_ACCOUNT_KEY")]
    key: Option<PathBuf>,
    /// Where job state is kept.
    #[arg(long, env = "HORDE_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl JobStateArgs {
    fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".horde")
        })
    }

    fn account(&self) -> anyhow::Result<SecretKey> {
        let path = self
            .key
            .clone()
            .unwrap_or_else(|| self.state_dir().join("account.json"));
        if !path.exists() {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let key = SecretKey::generate();
            key.write_key_file(&path)?;
            eprintln!("created account key {} ({})", path.display(), key.hotkey());
            return Ok(key);
        }
        Ok(SecretKey::read_key_file(&path)?)
    }
}

/// What is remembered about a job between commands.
#[derive(Serialize, Deserialize)]
struct JobState {
    job_id: String,
    facilitator: String,
    client_seed: String,
    miner: Option<String>,
    endpoint: Option<String>,
}

fn state_path(common: &JobStateArgs, job: &JobId) -> PathBuf {
    common.state_dir().join("jobs").join(format!("{job}.json"))
}

fn save_state(common: &JobStateArgs, job: &JobId, state: &JobState) -> anyhow::Result<()> {
    let path = state_path(common, job);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    crate::atomic_file::write_atomically(
        &path,
        serde_json::to_string_pretty(state)?.as_bytes(),
        0o600,
    )
    .with_context(|| format!("saving the state of job {job} to {}", path.display()))
}

fn load_state(common: &JobStateArgs, job: &JobId) -> anyhow::Result<JobState> {
    let path = state_path(common, job);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no state for job {job} at {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn parse_job(job: &str) -> anyhow::Result<JobId> {
    job.parse()
        .map_err(|_| anyhow::anyhow!("job id must be 32 hex digits, got {job:?}"))
}

fn print_status(started: Instant, update: &StatusUpdate) {
    out!(
        "[{:>6} ms] #{} {}",
        started.elapsed().as_millis(),
        update.seq,
        describe(&update.status)
    );
}

fn print_endpoint(endpoint: &VerifiedEndpoint) {
    out!(
        "endpoint verified: {} job key {} (signed by miner {})",
        endpoint.address(),
        endpoint.job_key(),
        endpoint.record.miner
    );
}

fn endpoint_from_state(state: &JobState, job_id: JobId) -> anyhow::Result<VerifiedEndpoint> {
    let (Some(record), Some(miner)) = (&state.endpoint, &state.miner) else {
        bail!("job {job_id} has no endpoint yet; see `horde job status {job_id}`");
    };
    let bytes = hex::decode(record)?;
    let signed: Signed<EndpointRecord> = from_bytes_exact(&bytes)?;
    Ok(VerifiedEndpoint::verify(
        &signed,
        job_id,
        &miner.parse()?,
        now(),
    )?)
}

/// The stored endpoint record without the expiry check: a report may come after the job ended.
fn stored_endpoint(state: &JobState, job_id: JobId) -> anyhow::Result<VerifiedEndpoint> {
    let (Some(record), Some(miner)) = (&state.endpoint, &state.miner) else {
        bail!("job {job_id} has no endpoint record; nothing to report");
    };
    let signed: Signed<EndpointRecord> = from_bytes_exact(&hex::decode(record)?)?;
    let miner: horde_protocol::Hotkey = miner.parse()?;
    let content = signed.verify_by(&miner)?;
    if content.job_id != job_id {
        bail!("stored endpoint record is for job {}", content.job_id);
    }
    Ok(VerifiedEndpoint {
        signed,
        record: content,
    })
}

/// The last receipt stored for the job.
fn last_receipt(common: &JobStateArgs, job_id: &JobId) -> anyhow::Result<String> {
    let path = receipts_path(common, job_id);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no receipts for job {job_id} at {}", path.display()))?;
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .with_context(|| format!("no receipts in {}", path.display()))
}

fn receipts_path(common: &JobStateArgs, job_id: &JobId) -> PathBuf {
    common
        .state_dir()
        .join("jobs")
        .join(format!("{job_id}.receipts"))
}

/// Loads a job's state, re-verifies its endpoint record and connects to the job with the per-job
/// client key.
async fn connect_job(
    common: &JobStateArgs,
    job: &str,
) -> anyhow::Result<(JobId, VerifiedEndpoint, JobConnection)> {
    let job_id = parse_job(job)?;
    let state = load_state(common, &job_id)?;
    let endpoint = endpoint_from_state(&state, job_id)?;
    let connection = JobConnection::connect(job_id, client_key(&state)?, &endpoint)
        .await
        .with_context(|| {
            format!(
                "connecting to job {job_id}'s endpoint {}",
                endpoint.address()
            )
        })?;
    Ok((job_id, endpoint, connection))
}

fn client_key(state: &JobState) -> anyhow::Result<SecretKey> {
    let mut seed = [0u8; 32];
    hex::decode_to_slice(&state.client_seed, &mut seed)?;
    Ok(SecretKey::from_seed(&seed))
}

/// The facilitator clients a command made, closed when it ends: a process that exits without
/// closing leaves its connection counted at the facilitator until the idle timeout, against
/// the per-key connection cap.
#[derive(Default)]
struct Facilitators(std::sync::Mutex<Vec<Client>>);

impl Facilitators {
    fn client(&self, account: SecretKey, facilitator: NodeAddr) -> anyhow::Result<Client> {
        let client = Client::new(account, facilitator)?;
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(client.clone());
        Ok(client)
    }

    async fn close(&self) {
        let clients = std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for client in clients {
            client.close().await;
        }
    }
}

impl JobCommand {
    /// A relay between local sockets and the job (`forward`): it runs on one thread.
    pub(crate) fn is_relay(&self) -> bool {
        matches!(self, Self::Forward { .. })
    }
}

/// Runs a `horde job` command.
pub async fn run_command(command: JobCommand) -> anyhow::Result<()> {
    let facilitators = Facilitators::default();
    let result = run(command, &facilitators).await;
    facilitators.close().await;
    result
}

async fn run(command: JobCommand, facilitators: &Facilitators) -> anyhow::Result<()> {
    match command {
        JobCommand::Run {
            spec,
            follow,
            common,
        } => submit(spec, follow, common, facilitators).await,
        JobCommand::Status {
            job,
            follow,
            common,
        } => status(job, follow, common, facilitators).await,
        JobCommand::Request(args) => request::request(args).await,
        JobCommand::Forward {
            job,
            listen,
            common,
        } => forward(job, listen, common).await,
        JobCommand::Volumes { job, spec, common } => volumes(job, spec, common, facilitators).await,
        JobCommand::Report(args) => report(args, facilitators).await,
        JobCommand::Terminate { job, common } => terminate(job, common, facilitators).await,
    }
}

/// Submits a job spec and follows its statuses until the endpoint is ready (or the end, with `--follow`).
async fn submit(
    spec: PathBuf,
    follow: bool,
    common: JobStateArgs,
    facilitators: &Facilitators,
) -> anyhow::Result<()> {
    let request = JobRequest::from_file(&spec)?;
    let facilitator: NodeAddr = common
        .facilitator
        .as_deref()
        .context("--facilitator HOTKEY@IP:PORT is required")?
        .parse()?;
    let client = facilitators.client(common.account()?, facilitator.clone())?;
    let started = Instant::now();
    let mut job = client
        .submit(&request)
        .await
        .with_context(|| format!("submitting the job to the facilitator {facilitator}"))?;
    let job_id = job.job_id();
    out!("job {job_id}");
    // The job runs whatever happens to its state here (a full disk): say so, and how to end it.
    let save_state = |common: &JobStateArgs, job_id: &JobId, state: &JobState| {
        save_state(common, job_id, state).with_context(|| {
            format!(
                "job {job_id} was submitted and runs on; `horde job terminate {job_id} \
                 --facilitator {facilitator}` ends it"
            )
        })
    };
    let mut state = JobState {
        job_id: job_id.to_string(),
        facilitator: facilitator.to_string(),
        client_seed: hex::encode(job.client_key().context("client key")?.seed().as_ref()),
        miner: None,
        endpoint: None,
    };
    save_state(&common, &job_id, &state)?;
    while let Some(update) = job.next_status().await? {
        print_status(started, &update);
        match &update.status {
            JobStatus::Assigned { miner, .. } => state.miner = Some(miner.to_string()),
            JobStatus::EndpointReady(signed) => {
                let endpoint = job.wait_for_endpoint().await?;
                print_endpoint(&endpoint);
                state.endpoint = Some(hex::encode(to_bytes(signed)));
                save_state(&common, &job_id, &state)?;
                if !follow {
                    out!("job is serving; `horde job request {job_id} GET /` talks to it");
                    return Ok(());
                }
            }
            status if status.is_terminal() => {
                save_state(&common, &job_id, &state)?;
                return exit_for(status);
            }
            _ => {}
        }
        save_state(&common, &job_id, &state)?;
    }
    Ok(())
}

/// Prints a job's status history, and follows it with `--follow`.
async fn status(
    job: String,
    follow: bool,
    common: JobStateArgs,
    facilitators: &Facilitators,
) -> anyhow::Result<()> {
    let job_id = parse_job(&job)?;
    let mut handle = attach(&common, job_id, facilitators).await?;
    let started = Instant::now();
    loop {
        let next = if follow {
            handle.next_status().await?
        } else {
            // The history arrives in one burst; once the stream is quiet it is all here.
            match tokio::time::timeout(HISTORY_IDLE, handle.next_status()).await {
                Ok(next) => next?,
                Err(_) => break,
            }
        };
        let Some(update) = next else { break };
        print_status(started, &update);
        if update.status.is_terminal() {
            return exit_for(&update.status);
        }
    }
    Ok(())
}

/// Tunnels a local TCP port to the job until ctrl-c, keeping every receipt.
async fn forward(job: String, listen: SocketAddr, common: JobStateArgs) -> anyhow::Result<()> {
    // Bind first: a busy address is the user's to fix before anything is dialed.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let (job_id, endpoint, connection) = connect_job(&common, &job).await?;
    out!(
        "forwarding {} -> job {job_id} at {}",
        listener.local_addr()?,
        endpoint.address()
    );
    let (receipts_tx, mut receipts_rx) = tokio::sync::mpsc::channel(64);
    let forward =
        horde_transport::tunnel::forward_tcp(listener, connection.tunnel.clone(), receipts_tx);
    tokio::pin!(forward);
    let result = loop {
        tokio::select! {
            result = &mut forward => break result.map_err(anyhow::Error::from),
            Some(receipt) = receipts_rx.recv() => {
                if let Err(error) = append_receipt(&common, &job_id, &receipt) {
                    break Err(error);
                }
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
        }
    };
    connection.close().await;
    result
}

/// Sends a volume list and waits until the job has fetched it.
async fn volumes(
    job: String,
    spec: PathBuf,
    common: JobStateArgs,
    facilitators: &Facilitators,
) -> anyhow::Result<()> {
    let job_id = parse_job(&job)?;
    let file = VolumeListFile::from_file(&spec)?;
    let mut handle = attach(&common, job_id, facilitators).await?;
    skip_history(&mut handle).await?;
    handle
        .send_volumes(file.volume_msg_id, file.fetch, file.upload)
        .await?;
    let id = file.volume_msg_id;
    handle
        .wait_for(
            |s| matches!(s, JobStatus::VolumesFetched { volume_msg_id } if *volume_msg_id == id),
        )
        .await?;
    out!("volumes {id} fetched");
    Ok(())
}

/// Signs a miner report from the stored endpoint record and a receipt, and prints the verdict.
async fn report(args: ReportArgs, facilitators: &Facilitators) -> anyhow::Result<()> {
    let ReportArgs {
        job,
        receipt,
        details,
        request_digest,
        response_digest,
        trusted_receipt,
        common,
    } = args;
    let job_id = parse_job(&job)?;
    let state = load_state(&common, &job_id)?;
    let endpoint = stored_endpoint(&state, job_id)?;
    let receipt_hex = match receipt {
        Some(hex) => hex,
        None => last_receipt(&common, &job_id)?,
    };
    let receipt: Signed<JobReceipt> = from_bytes_exact(&hex::decode(receipt_hex.trim())?)
        .context("--receipt is not a hex-encoded signed receipt")?;
    let content = receipt
        .verify_by(&endpoint.job_key())
        .context("the receipt is not signed by this job's key")?;
    let digest = |given: Option<String>, default: [u8; 32]| -> anyhow::Result<[u8; 32]> {
        let Some(text) = given else {
            return Ok(default);
        };
        let mut digest = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut digest).context("digests are 64 hex digits")?;
        Ok(digest)
    };
    let evidence = ReportEvidence {
        job_id,
        endpoint: endpoint.signed.clone(),
        receipt,
        request_digest: digest(request_digest, content.digest_in)?,
        response_digest: digest(response_digest, content.digest_out)?,
        trusted_receipt: trusted_receipt
            .map(|hex| -> anyhow::Result<Signed<JobReceipt>> {
                Ok(from_bytes_exact(&hex::decode(hex.trim())?)?)
            })
            .transpose()
            .context("--trusted-receipt is not a hex-encoded signed receipt")?,
    };
    let client = facilitators.client(common.account()?, state.facilitator.parse()?)?;
    let report = client.sign_report(evidence, &details);
    match client.report(&report).await? {
        ReportVerdict::Accepted { forwarded_to } => {
            out!(
                "report accepted: miner {} excluded, forwarded to {forwarded_to} validators",
                endpoint.record.miner
            );
            Ok(())
        }
        ReportVerdict::Refused(reason) => bail!("report refused: {reason}"),
        other => bail!("unexpected verdict {other:?}"),
    }
}

/// Ends the job and prints its result.
async fn terminate(
    job: String,
    common: JobStateArgs,
    facilitators: &Facilitators,
) -> anyhow::Result<()> {
    let job_id = parse_job(&job)?;
    let mut handle = attach(&common, job_id, facilitators).await?;
    skip_history(&mut handle).await?;
    handle.terminate().await?;
    let status = handle.wait_for_end().await?;
    out!("{}", describe(&status));
    exit_for(&status)
}

async fn attach(
    common: &JobStateArgs,
    job_id: JobId,
    facilitators: &Facilitators,
) -> anyhow::Result<crate::client::JobHandle> {
    let facilitator = match (&common.facilitator, load_state(common, &job_id)) {
        (Some(addr), _) => addr.clone(),
        (None, Ok(state)) => state.facilitator,
        (None, Err(error)) => return Err(error.context("pass --facilitator")),
    };
    let client = facilitators.client(common.account()?, facilitator.parse()?)?;
    client
        .attach(job_id, None)
        .await
        .with_context(|| format!("attaching to job {job_id} at the facilitator {facilitator}"))
}

/// Reads the replayed history (it arrives in one burst, then the stream goes quiet).
async fn skip_history(handle: &mut crate::client::JobHandle) -> anyhow::Result<()> {
    while let Ok(next) = tokio::time::timeout(HISTORY_IDLE, handle.next_status()).await {
        let Some(update) = next? else { break };
        if update.status.is_terminal() {
            bail!("job already ended: {}", describe(&update.status));
        }
    }
    Ok(())
}

/// The command's result for a job's last status: success for `Completed` with every upload
/// done; [`EXIT_NOT_UPLOADED`] for `Completed` with some upload (outputs or logs) that failed;
/// a plain failure otherwise.
fn exit_for(status: &JobStatus) -> anyhow::Result<()> {
    match status {
        JobStatus::Completed(result) if result.outputs.iter().any(|o| o.not_uploaded()) => {
            let failed: Vec<String> = result
                .outputs
                .iter()
                .filter(|o| o.not_uploaded())
                .map(|o| o.path.to_string())
                .collect();
            Err(CommandFailed {
                code: EXIT_NOT_UPLOADED,
                message: format!(
                    "job completed, but not uploaded: {} (see above)",
                    failed.join(", ")
                ),
            }
            .into())
        }
        JobStatus::Completed(_) => Ok(()),
        other => bail!("job ended: {}", describe(other)),
    }
}

fn append_receipt(
    common: &JobStateArgs,
    job_id: &JobId,
    receipt: &Signed<horde_protocol::JobReceipt>,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let path = receipts_path(common, job_id);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    writeln!(file, "{}", hex::encode(to_bytes(receipt)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use horde_protocol::Stage;
    use horde_protocol::messages::{
        DeclineReason, FailureReason, JobFailure, JobFinished, RejectReason,
    };

    use super::*;

    #[test]
    fn terminal_statuses_read_as_sentences() {
        let busy = JobStatus::Rejected(RejectReason::Declined(DeclineReason::Busy));
        assert_eq!(
            describe(&busy),
            "rejected: the miner declined: every executor of the class is busy"
        );
        let exited = JobStatus::Failed(JobFailure {
            stage: Stage::Execution,
            reason: FailureReason::NonZeroExit(3),
            result: Some(JobFinished {
                exit_code: Some(3),
                terminated: false,
                outputs: Vec::new(),
                stdout_tail: String::new(),
                stderr_tail: "no such model\n".to_owned(),
            }),
        });
        let text = describe(&exited);
        assert!(
            text.starts_with("failed in stage Execution: the job exited with status 3\n"),
            "{text}"
        );
        assert!(
            text.ends_with("--- stderr (tail)\nno such model\n"),
            "{text}"
        );
    }
}
