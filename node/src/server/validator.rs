//! The validator role: verifies a job and drives it against a miner, stage by stage.
//!
//! For each `Assign` from a facilitator — answered `AssignmentReceived` at once and acted on only
//! after the facilitator's `Proceed` (`validator/hand_over.rs`) — it verifies the client's signature and the spec's expiry,
//! checks that the miner is one it knows (and trusts, for `on_trusted_miner` jobs), sends
//! `InitialDetails`, waits for the reservation and the executor's readiness, sends the full
//! client-signed spec, verifies the miner's signed endpoint record before forwarding it, then
//! relays volume lists and terminate requests down and results up. Every stage has its deadline
//! from the spec; the validator's own clock adds [`STAGE_SLACK`] so that the executor, which
//! enforces the same deadlines with more detail, normally reports first.
//!
//! Miner reports forwarded by a facilitator (`ControlMessage::Report`) are verified again — the
//! reporter's signature and the chain miner hotkey → endpoint record → job key → receipt — and
//! the miner is excluded from selection for `[validator] exclusion_secs` from the time of the
//! report: `Assign`s naming it are refused with `MinerNotAllowed`. Exclusions are kept in
//! `<data_dir>/exclusions.json` (written to a temporary file, synced, then renamed), so a restart
//! keeps them.
//!
//! A facilitator that goes away (restart, crash, upgrade) does not end the jobs it assigned: the
//! validator drives them on, holds their statuses, and sends them up the new stream a returning
//! facilitator opens with `Resume(job_id)`, for up to [`FACILITATOR_AWAY_MAX`] (`link.rs`).
//!
//! Layout: `validator.rs` (checks, driving, stages, accounting), `validator/hand_over.rs` (an
//! `Assign` is answered at once and acted on only after the facilitator's `Proceed`),
//! `validator/link.rs` (the link to the facilitator that survives it), `validator/seen.rs` (job
//! ids seen).
//!
//! Each job id accepted is kept until its spec expires, also across restarts (`seen.rs`,
//! `<data_dir>/seen_jobs.bin`): the same signed spec assigned again — replayed by anyone who has
//! seen it — is refused with `DuplicateJobId` instead of being driven (and paid for) twice.
//!
//! Accounting: for each job the validator sends to a miner it issues a `Started` receipt when it
//! sends the job, an `Accepted` receipt when the miner reserves an executor and, for a job that
//! got past acceptance, a `Finished` receipt with the outcome and time taken when it ends (see
//! `horde_protocol::accounting`). Each receipt goes to the miner on a stream of its own
//! (`ControlMessage::Receipt`), in the background: the job never waits for it. The miner's
//! countersignature is verified and the countersigned receipt appended to
//! `<data_dir>/receipts.log`. A miner that refuses, answers with a bad countersignature, or does
//! not answer within `[receipts] countersign_timeout_ms` gets a warning in the log, and the
//! receipt is stored with the validator's signature only, with a note saying why (listed as
//! "countersigned: no" by `horde receipts`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use horde_protocol::messages::{
    Assignment, FailureReason, InitialJobDetails, JobDetails, JobFailure, ReceiptReply,
    RejectReason, ReportVerdict,
};
use horde_protocol::{
    AccountingReceipt, AccountingRecord, ControlMessage, Deadlines, DownMessage, ExecutorClass,
    Hotkey, JobId, JobOutcome, JobSpec, MinerReport, NodeAddr, ReceiptKind, Role, SecretKey,
    Signed, Stage, UnixMillis, UpMessage, verify_report,
};
use horde_transport::{
    ALPN_CONTROL, ConnectionCache, FramedRecv, FramedSend, JobSession, codes, open_session,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use horde_protocol::MAX_CLOCK_SKEW_MS;

use crate::clock::now;
use crate::server::config::ValidatorConfig;
use crate::server::discovery::{Directory, KnownPeers, wait_for_records};
use crate::server::receipts::ReceiptStore;
use crate::server::relay::{
    Hop, Relay, RelayPolicy, Step, bad_endpoint_record, endpoint_record_holds, ends_job,
};
use crate::server::role::{RoleHandle, Service};
use crate::server::streams::{request, serve_streams};

mod hand_over;
mod link;
mod seen;

pub use link::{AWAY_BUFFER, FACILITATOR_AWAY_MAX};
use link::{FacilitatorLink, Resumes};

pub use seen::SeenJobsError;
use seen::{Seen, SeenJobs};

/// Added to every stage deadline on the validator's clock (network and process start-up).
pub const STAGE_SLACK: Duration = Duration::from_secs(2);

/// The longest an assignment waits for the named miner's record to arrive by discovery.
const MINER_RECORD_WAIT: Duration = Duration::from_secs(1);

/// The exclusions file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExclusionsError {
    /// Reading, writing or renaming the file failed.
    #[error("exclusions file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("exclusions file {path}: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The validator's persisted state could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ValidatorStateError {
    /// The exclusions.
    #[error(transparent)]
    Exclusions(#[from] ExclusionsError),
    /// The job ids already accepted.
    #[error("seen jobs file {0}")]
    SeenJobs(#[from] SeenJobsError),
}

/// One excluded miner, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct ExclusionEntry {
    /// The miner's hotkey (SS58).
    miner: String,
    /// When its exclusion ends (Unix milliseconds).
    until_ms: u64,
}

/// Reported miners and when their exclusion ends, persisted in a JSON file.
#[derive(Debug)]
struct Exclusions {
    path: Option<PathBuf>,
    miners: Mutex<HashMap<Hotkey, UnixMillis>>,
    /// Serializes writers so the file always holds the latest map.
    writing: tokio::sync::Mutex<()>,
}

impl Exclusions {
    fn load(path: Option<PathBuf>) -> Result<Self, ExclusionsError> {
        let mut miners = HashMap::new();
        if let Some(path) = &path {
            let shown = path.display().to_string();
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let entries: Vec<ExclusionEntry> =
                        serde_json::from_str(&text).map_err(|e| ExclusionsError::Corrupt {
                            path: shown.clone(),
                            message: e.to_string(),
                        })?;
                    for entry in entries {
                        let miner = entry.miner.parse().map_err(|e| ExclusionsError::Corrupt {
                            path: shown.clone(),
                            message: format!("miner {:?}: {e}", entry.miner),
                        })?;
                        miners.insert(miner, UnixMillis(entry.until_ms));
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ExclusionsError::Io {
                        path: shown,
                        source,
                    });
                }
            }
        }
        Ok(Self {
            path,
            miners: Mutex::new(miners),
            writing: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Hotkey, UnixMillis>> {
        self.miners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_excluded(&self, miner: &Hotkey, now: UnixMillis) -> bool {
        self.lock().get(miner).is_some_and(|until| *until > now)
    }

    /// Excludes `miner` until `until` (a later existing end is kept) and persists the map.
    async fn exclude(&self, miner: Hotkey, until: UnixMillis) -> Result<(), ExclusionsError> {
        let _writing = self.writing.lock().await;
        let entries: Vec<ExclusionEntry> = {
            let mut miners = self.lock();
            let entry = miners.entry(miner).or_insert(until);
            *entry = (*entry).max(until);
            miners
                .iter()
                .map(|(miner, until)| ExclusionEntry {
                    miner: miner.to_string(),
                    until_ms: until.0,
                })
                .collect()
        };
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || write_exclusions(&path, &entries))
            .await
            .map_err(|e| ExclusionsError::Io {
                path: "exclusions".to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?
    }
}

/// Writes `entries` as JSON to `path` atomically.
fn write_exclusions(path: &Path, entries: &[ExclusionEntry]) -> Result<(), ExclusionsError> {
    let io = |source| ExclusionsError::Io {
        path: path.display().to_string(),
        source,
    };
    let text = serde_json::to_vec_pretty(entries).map_err(|e| io(std::io::Error::other(e)))?;
    crate::atomic_file::write_atomically(path, &text, 0o600).map_err(io)
}

/// Signs accounting receipts, has the miner countersign them, and stores them.
#[derive(Debug)]
struct ReceiptIssuer {
    key: SecretKey,
    store: ReceiptStore,
    countersign_timeout: Duration,
    cancel: CancellationToken,
}

impl ReceiptIssuer {
    /// Sends `receipt` to the miner, waits (bounded) for its countersignature, verifies it, and
    /// stores the receipt — countersigned, or with a note saying why not.
    async fn settle(
        self: Arc<Self>,
        connection: quinn::Connection,
        receipt: Signed<AccountingReceipt>,
        payload: AccountingReceipt,
    ) {
        let kind = payload.kind.name();
        let limit = self.countersign_timeout;
        let message = ControlMessage::Receipt(receipt.clone());
        let answer = tokio::select! {
            biased;
            () = self.cancel.cancelled() => {
                Err("the validator shut down before the miner answered".to_owned())
            }
            answer = tokio::time::timeout(limit, request(&connection, &message)) => {
                answer.map_or_else(
                    |_| Err(format!("no countersignature within {limit:?}")),
                    |answer| answer.map_err(|e| e.to_string()),
                )
            }
        };
        let (countersignature, note) = match answer {
            Ok(ControlMessage::ReceiptReply(ReceiptReply::Countersigned(countersignature))) => {
                match countersignature.verify(&receipt, &payload) {
                    Ok(()) => (Some(countersignature), None),
                    Err(error) => (None, Some(format!("bad countersignature: {error}"))),
                }
            }
            Ok(ControlMessage::ReceiptReply(ReceiptReply::Refused(reason))) => {
                (None, Some(format!("the miner refused: {reason}")))
            }
            Ok(other) => (None, Some(format!("unexpected answer {}", other.name()))),
            Err(reason) => (None, Some(reason)),
        };
        match &note {
            Some(note) => warn!(kind, %note, "receipt not countersigned; stored without"),
            None => debug!(kind, "receipt countersigned"),
        }
        let record = AccountingRecord {
            receipt,
            countersignature,
        };
        if let Err(error) = self.store.append(record, note, now()).await {
            warn!(kind, %error, "receipt not stored");
        }
    }
}

/// One job's receipts on the validator: what was issued, and the exchanges in flight.
#[derive(Debug)]
struct JobAccounting {
    issuer: Arc<ReceiptIssuer>,
    job_id: JobId,
    miner: Hotkey,
    class: ExecutorClass,
    /// The miner connection the job went out on; set when the job is sent.
    connection: Option<quinn::Connection>,
    started_at: Option<UnixMillis>,
    accepted: bool,
    exchanges: tokio::task::JoinSet<()>,
}

impl JobAccounting {
    fn new(issuer: Arc<ReceiptIssuer>, job_id: JobId, class: ExecutorClass, miner: Hotkey) -> Self {
        Self {
            issuer,
            job_id,
            miner,
            class,
            connection: None,
            started_at: None,
            accepted: false,
            exchanges: tokio::task::JoinSet::new(),
        }
    }

    /// Signs a receipt issued at `at` and settles it with the miner in the background.
    fn issue(&mut self, kind: ReceiptKind, at: UnixMillis) {
        let Some(connection) = self.connection.clone() else {
            return;
        };
        let payload = AccountingReceipt {
            kind,
            job_id: self.job_id,
            validator: self.issuer.key.hotkey(),
            miner: self.miner,
            executor_class: self.class.clone(),
            issued_at: at,
        };
        let receipt = Signed::sign(&self.issuer.key, &payload);
        let settle = Arc::clone(&self.issuer).settle(connection, receipt, payload);
        self.exchanges.spawn(settle.in_current_span());
    }

    /// The job was sent to the miner on `connection`.
    fn started(&mut self, connection: quinn::Connection) {
        let at = now();
        self.connection = Some(connection);
        self.started_at = Some(at);
        self.issue(ReceiptKind::Started, at);
    }

    /// The miner reserved an executor.
    fn accepted(&mut self) {
        self.accepted = true;
        self.issue(ReceiptKind::Accepted, now());
    }

    /// The job ended: a `Finished` receipt if it got past acceptance. Then waits for every
    /// exchange (each bounded by the countersignature timeout).
    async fn finish(mut self, outcome: JobOutcome) {
        if self.accepted
            && let Some(started_at) = self.started_at
        {
            let at = now();
            let time_took_ms = at.0.saturating_sub(started_at.0);
            self.issue(
                ReceiptKind::Finished {
                    outcome,
                    started_at,
                    time_took_ms,
                },
                at,
            );
        }
        while self.exchanges.join_next().await.is_some() {}
    }
}

/// How a job ended, for its `Finished` receipt: from the last message the validator sent up
/// (`None`: the facilitator went away and the job was abandoned).
fn job_outcome(last: Option<&UpMessage>, shutting_down: bool) -> JobOutcome {
    match last {
        _ if shutting_down => JobOutcome::Cancelled,
        None => JobOutcome::Cancelled,
        Some(UpMessage::Finished(_)) => JobOutcome::Completed,
        Some(UpMessage::Failed(JobFailure {
            stage,
            reason: FailureReason::Timeout,
            ..
        })) => JobOutcome::TimedOut { stage: *stage },
        Some(UpMessage::Failed(failure)) => JobOutcome::Failed {
            stage: failure.stage,
        },
        Some(_) => JobOutcome::HordeFailed,
    }
}

/// The validator service.
#[derive(Debug)]
pub struct Validator {
    hotkey: Hotkey,
    peers: ConnectionCache,
    config: ValidatorConfig,
    /// The miners this validator will drive jobs on: configured and discovered.
    miners: KnownPeers,
    exclusions: Exclusions,
    /// Job ids accepted and not yet expired: a replayed spec is refused.
    seen: Arc<SeenJobs>,
    receipts: Arc<ReceiptIssuer>,
    /// The jobs driven now, for a facilitator that comes back to resume them.
    resumes: Arc<Resumes>,
    cancel: CancellationToken,
}

impl Validator {
    /// The service, with the exclusions persisted by a previous run. Miners come from `config`
    /// and, when discovery runs, from `directory`: a miner neither lists is refused. Accounting
    /// receipts are signed with `key` (the endpoint's identity) and stored in `receipts`.
    pub fn new(
        endpoint: Arc<horde_transport::HordeEndpoint>,
        key: SecretKey,
        config: ValidatorConfig,
        directory: Option<Arc<Directory>>,
        receipts: ReceiptStore,
        countersign_timeout: Duration,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, ValidatorStateError> {
        let exclusions = Exclusions::load(config.exclusions_file.clone())?;
        let seen = Arc::new(SeenJobs::load(config.seen_jobs_file.clone(), now())?);
        let receipts = Arc::new(ReceiptIssuer {
            key,
            store: receipts,
            countersign_timeout,
            cancel: cancel.clone(),
        });
        Ok(Arc::new(Self {
            hotkey: endpoint.hotkey(),
            peers: ConnectionCache::new(endpoint),
            miners: KnownPeers::new(Role::Miner, config.miners.clone(), directory),
            config,
            exclusions,
            seen,
            receipts,
            resumes: Arc::new(Resumes::default()),
            cancel,
        }))
    }

    /// Starts the role. Its tasks are the jobs it drives, one per facilitator stream: they live
    /// with their connections and end on the validator's cancellation.
    pub(crate) fn start(self: Arc<Self>) -> RoleHandle {
        let cancel = self.cancel.clone();
        RoleHandle::new(Role::Validator, Service::Validator(self), cancel)
    }

    /// Whether `miner` is excluded now because of a verified report.
    pub fn is_excluded(&self, miner: &Hotkey) -> bool {
        self.exclusions.is_excluded(miner, now())
    }

    /// Serves one facilitator connection: each stream is one job.
    pub async fn handle_connection(self: Arc<Self>, connection: quinn::Connection, peer: Hotkey) {
        let cancel = self.cancel.clone();
        serve_streams(&connection, &cancel, |send, recv, first| {
            let this = Arc::clone(&self);
            async move { this.handle_stream(peer, send, recv, first).await }
        })
        .await;
    }

    async fn handle_stream(
        self: Arc<Self>,
        peer: Hotkey,
        mut send: FramedSend,
        mut recv: FramedRecv,
        first: ControlMessage,
    ) {
        let assignment = match first {
            ControlMessage::Down(DownMessage::Assign(assignment)) => assignment,
            ControlMessage::Down(DownMessage::Resume(job_id)) => {
                let session = JobSession::new(job_id, peer, send, recv);
                if let Err(refused) = self.resumes.offer(job_id, &peer, session) {
                    let (reason, mut session) = *refused;
                    info!(%peer, job = %job_id.fmt_short(), %reason, "resume refused");
                    let _ = session
                        .send_up(&UpMessage::Rejected(RejectReason::UnknownJob))
                        .await;
                    let _ = session.finish();
                }
                return;
            }
            ControlMessage::Report(report) => {
                let verdict = match self.accept_report(&peer, &report).await {
                    Ok(()) => ReportVerdict::Accepted { forwarded_to: 0 },
                    Err(reason) => {
                        info!(%peer, %reason, "miner report refused");
                        ReportVerdict::Refused(reason.to_string())
                    }
                };
                let _ = send.send(&ControlMessage::ReportVerdict(verdict)).await;
                let _ = send.finish();
                return;
            }
            _ => {
                warn!(%peer, "unexpected first message on a facilitator stream");
                recv.stop(codes::PROTOCOL_VIOLATION);
                send.reset(codes::PROTOCOL_VIOLATION);
                return;
            }
        };
        let handed_over = tokio::select! {
            () = self.cancel.cancelled() => return,
            handed_over = hand_over::hand_over(&mut send, &mut recv, hand_over::PROCEED_WAIT) => handed_over,
        };
        if let Err(error) = handed_over {
            info!(%peer, %error, "assignment dropped before it was acted on");
            let code = match error {
                hand_over::HandOverError::Unexpected(_) => codes::PROTOCOL_VIOLATION,
                _ => codes::CANCELLED,
            };
            recv.stop(code);
            send.reset(code);
            return;
        }
        self.await_miner_record(&assignment.miner.hotkey).await;
        let checked = match self.check_assignment(&peer, &assignment) {
            // Last, so only specs accepted otherwise are recorded.
            Ok(spec) => self.check_not_replayed(&peer, spec).await,
            Err(reason) => Err(reason),
        };
        let spec = match checked {
            Ok(spec) => spec,
            Err(reason) => {
                info!(%peer, ?reason, "job refused");
                let _ = send
                    .send(&ControlMessage::Up(UpMessage::Rejected(reason)))
                    .await;
                let _ = send.finish();
                return;
            }
        };
        let job_id = spec.job_id;
        let upstream = JobSession::new(job_id, peer, send, recv);
        let span = info_span!("job", job = %job_id.fmt_short());
        self.drive(upstream, assignment, spec)
            .instrument(span)
            .await;
    }

    /// Verifies a forwarded report again (signatures and the endpoint → receipt chain; the
    /// facilitator checked ownership) and excludes the miner.
    async fn accept_report(
        &self,
        facilitator: &Hotkey,
        signed: &Signed<MinerReport>,
    ) -> Result<(), ReportRefusal> {
        if let Some(allowed) = &self.config.allowed_facilitators
            && !allowed.contains(facilitator)
        {
            return Err(ReportRefusal::FacilitatorNotAllowed(*facilitator));
        }
        let verified = verify_report(signed, None)?;
        if verified.report.reported_at.0 > now().0.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(ReportRefusal::FromTheFuture);
        }
        let miner = verified.miner();
        let until = verified.exclusion_end(crate::clock::millis(self.config.exclusion), now());
        self.exclusions
            .exclude(miner, until)
            .await
            .map_err(|error| {
                warn!(%error, "could not persist an exclusion");
                ReportRefusal::NotPersisted
            })?;
        info!(%miner, job = %verified.report.job_id.fmt_short(), until = until.0,
            "miner report verified; miner excluded");
        Ok(())
    }

    fn check_assignment(
        &self,
        facilitator: &Hotkey,
        assignment: &Assignment,
    ) -> Result<JobSpec, RejectReason> {
        if let Some(allowed) = &self.config.allowed_facilitators
            && !allowed.contains(facilitator)
        {
            return Err(RejectReason::ClientNotAllowed);
        }
        let spec = assignment
            .spec
            .verify()
            .map_err(|_| RejectReason::BadSignature)?;
        if !spec.is_current(now(), MAX_CLOCK_SKEW_MS) {
            return Err(RejectReason::Expired);
        }
        if self.known_miner(&assignment.miner.hotkey).is_none()
            || self.is_excluded(&assignment.miner.hotkey)
        {
            return Err(RejectReason::MinerNotAllowed);
        }
        if spec.on_trusted_miner
            && !self
                .config
                .trusted_miners
                .contains(&assignment.miner.hotkey)
        {
            return Err(RejectReason::MinerNotAllowed);
        }
        Ok(spec)
    }

    /// Records the job id of `spec`, refusing a spec whose id was accepted before (a replay).
    async fn check_not_replayed(
        &self,
        facilitator: &Hotkey,
        spec: JobSpec,
    ) -> Result<JobSpec, RejectReason> {
        let seen = Arc::clone(&self.seen);
        let (job_id, expires_at) = (spec.job_id, spec.expires_at);
        // The file write (and, now and then, a compaction with fsyncs) stays off the workers.
        let recorded =
            tokio::task::spawn_blocking(move || seen.insert(job_id, expires_at, now())).await;
        let (seen, written) = match recorded {
            Ok(recorded) => recorded,
            Err(error) => {
                warn!(%error, "recording an accepted job id failed");
                return Err(RejectReason::InvalidSpec(
                    "the validator could not record the job".to_owned(),
                ));
            }
        };
        if let Err(error) = written {
            // Still refused in memory until a restart; the operator needs to know.
            warn!(%error, "could not persist an accepted job id");
        }
        if seen == Seen::Replayed {
            warn!(%facilitator, job = %job_id.fmt_short(), "replayed job spec refused");
            return Err(RejectReason::DuplicateJobId);
        }
        Ok(spec)
    }

    /// A miner the facilitator chose from its records may not have reached this validator's yet
    /// (records spread within milliseconds): waits for it up to [`MINER_RECORD_WAIT`] before the
    /// assignment is checked (an unknown miner is then refused with `MinerNotAllowed`).
    async fn await_miner_record(&self, miner: &Hotkey) {
        wait_for_records(self.miners.changes(), MINER_RECORD_WAIT, || {
            self.known_miner(miner)
        })
        .await;
    }

    fn known_miner(&self, hotkey: &Hotkey) -> Option<NodeAddr> {
        self.miners.find(hotkey)
    }

    fn hop(&self) -> Hop {
        Hop {
            role: Role::Validator,
            hotkey: self.hotkey,
        }
    }

    async fn drive(&self, upstream: JobSession, assignment: Assignment, spec: JobSpec) {
        let job_id = spec.job_id;
        let facilitator = *upstream.peer();
        let mut upstream = self.resumes.link(job_id, facilitator, upstream);
        let mut accounting = JobAccounting::new(
            Arc::clone(&self.receipts),
            job_id,
            spec.executor_class.clone(),
            assignment.miner.hotkey,
        );
        let outcome = self
            .drive_inner(&mut upstream, &assignment, &spec, &mut accounting)
            .await;
        let ended = job_outcome(outcome.as_ref(), self.cancel.is_cancelled());
        // The accounting does not wait for an away facilitator.
        let report = async {
            tokio::select! {
                () = self.cancel.cancelled() => {}
                () = upstream.finish_with(outcome) => {}
            }
        };
        tokio::join!(report, accounting.finish(ended));
        debug!(job = %job_id.fmt_short(), "job session over");
    }

    /// Drives the miner session; returns the final message to send up when the miner did not
    /// deliver one itself.
    async fn drive_inner(
        &self,
        upstream: &mut FacilitatorLink,
        assignment: &Assignment,
        spec: &JobSpec,
        accounting: &mut JobAccounting,
    ) -> Option<UpMessage> {
        let job_id = spec.job_id;
        // Dial the miner at the address we know, not the one we were told.
        let miner = self.known_miner(&assignment.miner.hotkey)?;
        let connection = match self.peers.connect(&miner, ALPN_CONTROL).await {
            Ok(connection) => connection,
            Err(error) => {
                return Some(
                    self.hop()
                        .failed_up(format!("miner {} unreachable: {error}", miner.hotkey)),
                );
            }
        };
        let initial = InitialJobDetails {
            job_id,
            executor_class: spec.executor_class.clone(),
            program: spec.program.clone(),
            deadlines: spec.deadlines,
            client_key: spec.client_key,
            validator: self.hotkey,
        };
        let downstream =
            match open_session(&connection, job_id, &DownMessage::InitialDetails(initial)).await {
                Ok(session) => session,
                Err(error) => {
                    return Some(
                        self.hop()
                            .failed_up(format!("miner session failed: {error}")),
                    );
                }
            };
        accounting.started(connection);
        let mut policy = Stages {
            hop: self.hop(),
            job_id,
            miner: miner.hotkey,
            assignment,
            deadlines: spec.deadlines,
            stage: Stage::Reservation,
            deadline: tokio::time::Instant::now()
                + stage_limit(&spec.deadlines, Stage::Reservation),
            accounting,
        };
        let relay = Relay::new(
            self.hop(),
            format!("miner {}", miner.hotkey),
            "facilitator",
            downstream,
            &self.cancel,
        );
        relay.run(upstream, &mut policy).await
    }
}

/// How long `stage` may take on the validator's clock: the spec's deadline plus [`STAGE_SLACK`].
fn stage_limit(deadlines: &Deadlines, stage: Stage) -> Duration {
    let millis = match stage {
        Stage::Reservation => deadlines.reservation_ms,
        Stage::ExecutorStartup => deadlines.executor_startup_ms,
        // Fetching volumes, starting the job and its readiness form one wait here.
        Stage::VolumeDownload | Stage::Readiness => deadlines
            .volume_download_ms
            .saturating_add(deadlines.readiness_ms),
        _ => deadlines.execution_ms.saturating_add(deadlines.upload_ms),
    };
    Duration::from_millis(millis) + STAGE_SLACK
}

/// The validator's relay policy: the miner's messages must come in stage order (reservation,
/// executor start-up, the job's readiness, execution), each stage within its deadline; the full
/// details go down once the executor is ready; the endpoint record must be the chosen miner's;
/// client messages must be the job owner's.
#[derive(Debug)]
struct Stages<'a> {
    hop: Hop,
    job_id: JobId,
    miner: Hotkey,
    assignment: &'a Assignment,
    deadlines: Deadlines,
    stage: Stage,
    deadline: tokio::time::Instant,
    accounting: &'a mut JobAccounting,
}

impl Stages<'_> {
    fn enter(&mut self, stage: Stage) {
        self.stage = stage;
        self.deadline = tokio::time::Instant::now() + stage_limit(&self.deadlines, stage);
    }
}

impl RelayPolicy for Stages<'_> {
    fn on_up(&mut self, message: UpMessage) -> Step {
        match (self.stage, message) {
            (Stage::Reservation, UpMessage::Accepted) => {
                self.accounting.accepted();
                self.enter(Stage::ExecutorStartup);
                Step::Up(UpMessage::Accepted)
            }
            (Stage::ExecutorStartup, UpMessage::ExecutorReady) => {
                self.enter(Stage::VolumeDownload);
                let details = JobDetails {
                    spec: self.assignment.spec.clone(),
                };
                Step::DownThenUp(DownMessage::FullDetails(details), UpMessage::ExecutorReady)
            }
            (Stage::VolumeDownload, UpMessage::Endpoint(record)) => {
                if endpoint_record_holds(&record, self.job_id, &self.miner, now()) {
                    self.enter(Stage::Execution);
                    Step::Up(UpMessage::Endpoint(record))
                } else {
                    warn!("miner's endpoint record does not verify");
                    bad_endpoint_record()
                }
            }
            (_, message @ (UpMessage::VolumesFetched { .. } | UpMessage::UploadDone(_))) => {
                Step::Up(message)
            }
            (_, message) if ends_job(&message) => Step::End(message),
            (stage, message) => {
                warn!(
                    ?stage,
                    message = message.name(),
                    "miner message out of order"
                );
                Step::Fail {
                    code: codes::PROTOCOL_VIOLATION,
                    message: self
                        .hop
                        .failed_up(format!("miner sent {} during {stage:?}", message.name())),
                }
            }
        }
    }

    /// Volume lists and terminate requests pass if signed by the account that signed the spec.
    fn on_down(&mut self, message: DownMessage) -> Step {
        if !matches!(message, DownMessage::Volumes(_) | DownMessage::Terminate(_)) {
            warn!(message = ?message, "unexpected message from facilitator");
            return Step::Drop;
        }
        match message.check_from_owner(self.job_id, self.assignment.spec.signer()) {
            Ok(()) => Step::Down(message),
            Err(reason) => {
                warn!(%reason, "client message refused; dropped");
                Step::Drop
            }
        }
    }

    fn deadline(&self) -> Option<tokio::time::Instant> {
        Some(self.deadline)
    }

    fn on_deadline(&mut self) -> Step {
        warn!(stage = ?self.stage, "stage deadline passed");
        Step::Fail {
            code: codes::CANCELLED,
            message: UpMessage::Failed(JobFailure {
                stage: self.stage,
                reason: FailureReason::Timeout,
                result: None,
            }),
        }
    }
}

/// Why a forwarded miner report is refused; the text goes back to the facilitator in
/// `ReportVerdict::Refused`.
#[derive(Debug, thiserror::Error)]
enum ReportRefusal {
    #[error("facilitator {0} is not allowed")]
    FacilitatorNotAllowed(Hotkey),
    /// The chain of signatures does not hold.
    #[error(transparent)]
    Invalid(#[from] horde_protocol::ReportError),
    #[error("report dated in the future")]
    FromTheFuture,
    #[error("the validator could not persist the exclusion")]
    NotPersisted,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::receipts::{DEFAULT_MAX_LOG_BYTES, StoredReceipt, log_path, read_log};
    use horde_protocol::messages::{HordeFailure, JobFinished};
    use horde_protocol::{Countersignature, JobOutcome};
    use horde_transport::accept_stream;
    use horde_transport::test_utils::{connected_pair, seeded_key};

    const JOB: JobId = JobId([3; 16]);

    /// A job's accounting on a validator with key 1 (the pair's client), against `miner`.
    fn job_accounting(dir: &Path, miner: Hotkey, timeout: Duration) -> JobAccounting {
        let issuer = Arc::new(ReceiptIssuer {
            key: seeded_key(1),
            store: ReceiptStore::open(dir, DEFAULT_MAX_LOG_BYTES).unwrap(),
            countersign_timeout: timeout,
            cancel: CancellationToken::new(),
        });
        JobAccounting::new(issuer, JOB, ExecutorClass("cpu".into()), miner)
    }

    fn stored(dir: &Path) -> Vec<StoredReceipt> {
        read_log(&log_path(dir)).unwrap().entries
    }

    fn kinds(entries: &[StoredReceipt]) -> Vec<&'static str> {
        entries
            .iter()
            .map(|e| e.record.verify().unwrap().receipt.kind.name())
            .collect()
    }

    #[tokio::test]
    async fn a_silent_miner_leaves_receipts_uncountersigned_and_never_blocks() {
        let pair = connected_pair().await;
        let dir = tempfile::tempdir().unwrap();
        // The miner side accepts no stream and answers nothing.
        let timeout = Duration::from_millis(300);
        let mut accounting = job_accounting(dir.path(), seeded_key(2).hotkey(), timeout);
        let begun = tokio::time::Instant::now();
        accounting.started(pair.client.clone());
        accounting.accepted();
        assert!(
            begun.elapsed() < timeout,
            "issuing does not wait for the miner"
        );
        accounting.finish(JobOutcome::Completed).await;
        let entries = stored(dir.path());
        assert_eq!(kinds(&entries).len(), 3);
        assert!(kinds(&entries).contains(&"finished"));
        for entry in &entries {
            assert!(!entry.record.verify().unwrap().countersigned);
            let note = entry.note.as_deref().unwrap();
            assert!(note.contains("no countersignature within"), "{note}");
        }
    }

    #[tokio::test]
    async fn refusals_and_forged_countersignatures_are_recorded_as_not_countersigned() {
        let pair = connected_pair().await;
        let dir = tempfile::tempdir().unwrap();
        let miner = seeded_key(2);
        // A miner that countersigns `started` with another key, refuses `accepted`, and
        // countersigns `finished` properly.
        let server = pair.server.clone();
        let fake_miner = tokio::spawn(async move {
            while let Ok(Some((mut send, _recv, first))) = accept_stream(&server).await {
                let ControlMessage::Receipt(receipt) = first else {
                    panic!("expected a receipt, got {first:?}");
                };
                let kind = receipt.verify().unwrap().kind;
                let reply = match kind {
                    ReceiptKind::Started => {
                        let forged = Countersignature::sign(&seeded_key(9), &receipt);
                        ReceiptReply::Countersigned(Countersignature {
                            miner: miner.hotkey(),
                            signature: forged.signature,
                        })
                    }
                    ReceiptKind::Accepted => ReceiptReply::Refused("not today".into()),
                    _ => ReceiptReply::Countersigned(Countersignature::sign(&miner, &receipt)),
                };
                send.send(&ControlMessage::ReceiptReply(reply))
                    .await
                    .unwrap();
                let _ = send.finish();
            }
        });
        let mut accounting =
            job_accounting(dir.path(), seeded_key(2).hotkey(), Duration::from_secs(5));
        accounting.started(pair.client.clone());
        accounting.accepted();
        accounting
            .finish(JobOutcome::TimedOut {
                stage: Stage::Execution,
            })
            .await;
        let entries = stored(dir.path());
        let note = |kind: &str| {
            entries
                .iter()
                .find(|e| e.record.verify().unwrap().receipt.kind.name() == kind)
                .unwrap()
                .note
                .clone()
        };
        assert!(
            note("started").unwrap().starts_with("bad countersignature"),
            "{:?}",
            note("started")
        );
        assert_eq!(note("accepted").unwrap(), "the miner refused: not today");
        assert_eq!(note("finished"), None);
        let finished = entries
            .iter()
            .find_map(|e| e.record.verify_countersigned().ok())
            .unwrap();
        match finished.kind {
            ReceiptKind::Finished {
                outcome,
                started_at,
                time_took_ms,
            } => {
                assert_eq!(
                    outcome,
                    JobOutcome::TimedOut {
                        stage: Stage::Execution
                    }
                );
                assert_eq!(finished.issued_at.0 - started_at.0, time_took_ms);
            }
            other => panic!("expected finished, got {other:?}"),
        }
        fake_miner.abort();
    }

    #[tokio::test]
    async fn no_finished_receipt_for_a_job_never_accepted() {
        let pair = connected_pair().await;
        let dir = tempfile::tempdir().unwrap();
        let mut accounting = job_accounting(
            dir.path(),
            seeded_key(2).hotkey(),
            Duration::from_millis(100),
        );
        accounting.started(pair.client.clone());
        accounting.finish(JobOutcome::HordeFailed).await;
        assert_eq!(kinds(&stored(dir.path())), vec!["started"]);
        // Nothing is issued before the job is sent.
        let dir = tempfile::tempdir().unwrap();
        let mut accounting = job_accounting(
            dir.path(),
            seeded_key(2).hotkey(),
            Duration::from_millis(100),
        );
        accounting.accepted();
        accounting.finish(JobOutcome::Completed).await;
        assert!(stored(dir.path()).is_empty());
    }

    #[test]
    fn outcomes_follow_the_last_message() {
        let failed = |reason| {
            UpMessage::Failed(JobFailure {
                stage: Stage::Upload,
                reason,
                result: None,
            })
        };
        let finished = UpMessage::Finished(JobFinished {
            exit_code: Some(0),
            terminated: false,
            outputs: vec![],
            stdout_tail: String::new(),
            stderr_tail: String::new(),
        });
        let horde = UpMessage::HordeFailed(HordeFailure {
            reported_by: Role::Miner,
            reporter: seeded_key(2).hotkey(),
            reason: "gone".into(),
        });
        for (last, shutting_down, expected) in [
            (Some(&finished), false, JobOutcome::Completed),
            (Some(&finished), true, JobOutcome::Cancelled),
            (None, false, JobOutcome::Cancelled),
            (Some(&horde), false, JobOutcome::HordeFailed),
            (
                Some(&failed(FailureReason::Timeout)),
                false,
                JobOutcome::TimedOut {
                    stage: Stage::Upload,
                },
            ),
            (
                Some(&failed(FailureReason::NonZeroExit(3))),
                false,
                JobOutcome::Failed {
                    stage: Stage::Upload,
                },
            ),
        ] {
            assert_eq!(job_outcome(last, shutting_down), expected, "{last:?}");
        }
    }

    #[tokio::test]
    async fn exclusions_survive_reload_and_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exclusions.json");
        let miner = SecretKey::from_seed(&[5; 32]).hotkey();
        let other = SecretKey::from_seed(&[6; 32]).hotkey();
        {
            let exclusions = Exclusions::load(Some(path.clone())).unwrap();
            exclusions.exclude(miner, UnixMillis(1_000)).await.unwrap();
            exclusions.exclude(miner, UnixMillis(500)).await.unwrap();
            exclusions.exclude(other, UnixMillis(10)).await.unwrap();
        }
        let exclusions = Exclusions::load(Some(path.clone())).unwrap();
        assert!(exclusions.is_excluded(&miner, UnixMillis(999)));
        assert!(!exclusions.is_excluded(&miner, UnixMillis(1_000)));
        assert!(!exclusions.is_excluded(&other, UnixMillis(11)));
        assert!(!path.with_extension("json.tmp").exists());

        std::fs::write(&path, "{ not json").unwrap();
        assert!(matches!(
            Exclusions::load(Some(path)),
            Err(ExclusionsError::Corrupt { .. })
        ));
    }
}
