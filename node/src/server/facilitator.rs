//! The facilitator role: the clients' entry point.
//!
//! It accepts client-signed job specs on `horde/control/1`, refuses bad signatures, expired specs,
//! unknown clients (when an allow-list is set) and reused job ids, persists each job and every
//! status change in its [`JobStore`], chooses a validator and a miner, drives the job's session to
//! the validator, and pushes every status to the client on the client's job stream. A client
//! that reconnects re-attaches with `Attach(job_id)` and gets the history, then live statuses.
//!
//! Each job is driven by its own task, independent of the client's stream: a client that goes
//! away does not end its job. A job whose validator link dies (QUIC idle timeout) or that
//! outlives all its stage deadlines plus `validator_silence_ms` ends `HordeFailed`. A facilitator
//! that stops (gracefully or not) does not end its jobs: on start-up, jobs a previous run left
//! running with a validator are resumed from the store (`facilitator/resume.rs`; the validator
//! drove them on meanwhile), and those not yet assigned are failed explicitly, never silently
//! lost.
//!
//! Layout: `facilitator.rs` (admission, choice, job drivers), `facilitator/leg.rs` (the job's
//! validator leg: the two-step hand-over and the relay), `facilitator/store.rs` (the redb
//! job store), `facilitator/resume.rs` (jobs taken up again after a restart),
//! `facilitator/warmup.rs` (why there is no miner: warming up, all busy, none),
//! `facilitator/claims.rs` (executors just assigned, before the miners' records say so),
//! `facilitator/unreachable.rs` (validators that could not be reached lately, tried last),
//! `facilitator/unrecorded.rs` (statuses the store could not take yet: sent to the clients,
//! stored once it can).
//!
//! A job with no miner is refused with what the facilitator knows: `WarmingUp { retry_after_ms }`
//! at submission while it is still learning the network (not stored, so the same signed spec
//! may come again; clients retry within the spec's reservation deadline), `AllBusy { class,
//! executors }` when miners offer the class but none has a free executor, `NoMiner` when no
//! miner offers it.
//!
//! Miner reports (`ControlMessage::Report`) are verified end to end — reporter signature, the
//! reporter owns the job, the endpoint record is signed by the miner this facilitator assigned,
//! the receipt by the record's job key, not seen before — then forwarded to every validator and
//! the miner is excluded from choice here too (persisted in the store). `on_trusted_miner` jobs are
//! only given miners in `[facilitator] trusted_miners`: the facilitator picks the trusted miner
//! itself, so the miner in `Assigned` — which the client verifies the endpoint record against —
//! is the one that runs the job; validators still refuse a miner they do not trust.

mod claims;
mod leg;
mod resume;
pub mod store;
mod unreachable;
mod unrecorded;
mod warmup;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use horde_protocol::messages::{RejectReason, ReportVerdict, StatusUpdate};
use horde_protocol::{
    ControlMessage, Deadlines, DownMessage, Hotkey, JobId, JobSpec, JobStatus, MinerReport,
    NodeAddr, Role, Signed, UnixMillis, UpMessage, VerifiedReport, verify_report,
};
use horde_transport::{
    ALPN_CONTROL, ChannelError, ConnectionCache, FramedRecv, FramedSend, HordeEndpoint, KnownKeys,
    codes,
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use horde_protocol::MAX_CLOCK_SKEW_MS;

use crate::clock::now;
use crate::server::config::FacilitatorConfig;
use crate::server::discovery::{Directory, KnownPeers, wait_for_records};
use crate::server::relay::Hop;
use crate::server::role::{ChildTasks, RoleHandle, Service, join_all};
use crate::server::streams::{request, serve_streams};
use claims::Claims;
use leg::ValidatorLeg;
use store::{JobStore, JobStoreError};
use warmup::WarmUp;

/// Why a miner report is refused; the text goes back to the reporter in
/// `ReportVerdict::Refused`.
#[derive(Debug, thiserror::Error)]
enum ReportRefusal {
    #[error("bad reporter signature: {0}")]
    BadSignature(horde_protocol::VerifyError),
    #[error("report dated in the future")]
    FromTheFuture,
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    #[error("not the owner of job {job_id}: reported by {reporter}, owned by {owner}")]
    NotOwner {
        job_id: JobId,
        reporter: Hotkey,
        owner: Hotkey,
    },
    #[error("job {0} was never assigned a miner")]
    NeverAssigned(JobId),
    /// The chain of signatures does not hold.
    #[error(transparent)]
    Invalid(#[from] horde_protocol::ReportError),
    #[error("duplicate report: {0}")]
    Duplicate(&'static str),
    #[error("the facilitator could not read the job")]
    ReadFailed,
    #[error("the facilitator could not store the report")]
    StoreFailed,
}

/// An exchange with a validator (an assignment, a forwarded report) that did not go through.
#[derive(Debug, thiserror::Error)]
enum ValidatorLinkError {
    #[error(transparent)]
    Connect(#[from] horde_transport::DialError),
    #[error(transparent)]
    Request(#[from] crate::server::streams::RequestError),
    #[error(transparent)]
    Session(#[from] horde_transport::SessionError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("unexpected answer {0}")]
    Unexpected(String),
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
}

/// Live statuses buffered per job for attached clients; a client further behind than this is
/// disconnected and re-attaches from the store.
const LIVE_STATUS_BUFFER: usize = 64;

/// Client messages (volume lists, terminate) queued per job toward its validator.
const DOWN_QUEUE: usize = 16;

/// How long a validator has to answer a forwarded report before it is counted as not reached.
const REPORT_FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a job waits for a miner with a free executor of its class before `NoMiner`.
const MINER_WAIT_MAX: Duration = Duration::from_secs(2);

/// The live side of a running job.
#[derive(Debug, Clone)]
struct LiveJob {
    statuses: broadcast::Sender<StatusUpdate>,
    down: mpsc::Sender<DownMessage>,
    /// The account that submitted it (a known key while the job runs).
    owner: Hotkey,
    /// Its statuses the store could not take yet.
    unrecorded: unrecorded::SharedUnrecorded,
}

/// The facilitator service.
#[derive(Debug)]
pub struct Facilitator {
    hotkey: Hotkey,
    peers: ConnectionCache,
    store: JobStore,
    config: FacilitatorConfig,
    /// Validators to choose from: configured and discovered.
    validators: KnownPeers,
    /// Miners to choose from: configured and discovered (with their free capacity).
    miners: KnownPeers,
    live: Mutex<HashMap<JobId, LiveJob>>,
    /// Reported miners and when their exclusion ends (mirrors the store).
    excluded: Mutex<HashMap<Hotkey, UnixMillis>>,
    /// Round-robin positions over miners and over validators (separate, so one does not
    /// skip the other's turns).
    next_miner: AtomicUsize,
    next_validator: AtomicUsize,
    unreachable: unreachable::Unreachable,
    /// How far it has learnt the network since it started.
    warm_up: WarmUp,
    /// Executors just given jobs, before their miners' records say so.
    claims: Claims,
    /// The discovered nodes (their keys are known to admission).
    directory: Option<Arc<Directory>>,
    cancel: CancellationToken,
    /// The job drivers ([`Facilitator::drive_job`]): they outlive the client's stream (a client
    /// may re-attach) and end with the job or on `cancel`; shutdown waits for them.
    jobs: Mutex<ChildTasks>,
}

fn total_deadline(deadlines: &Deadlines) -> Duration {
    let sum = deadlines
        .reservation_ms
        .saturating_add(deadlines.executor_startup_ms)
        .saturating_add(deadlines.volume_download_ms)
        .saturating_add(deadlines.readiness_ms)
        .saturating_add(deadlines.execution_ms)
        .saturating_add(deadlines.upload_ms);
    Duration::from_millis(sum)
}

/// Admission favours known keys (transport's `admission.rs`): configured validators and miners,
/// every node in the discovered directory, and the accounts with jobs in flight here.
impl KnownKeys for Facilitator {
    fn is_known(&self, key: &Hotkey) -> bool {
        self.config
            .validators
            .iter()
            .any(|peer| peer.hotkey == *key)
            || self.config.miners.iter().any(|peer| peer.hotkey == *key)
            || self
                .directory
                .as_ref()
                .is_some_and(|directory| directory.get(key, now()).is_some())
            || self.lock_live().values().any(|live| live.owner == *key)
    }
}

impl Facilitator {
    /// Opens the store, fails jobs a previous run left unfinished, and starts the role: its
    /// handle owns the job drivers, which end (failing their jobs `HordeFailed`) on `cancel`.
    /// Validators and miners come from `config` and, when discovery runs, from `directory`;
    /// `warm_up` is how long after start an empty directory means "still learning" (the record
    /// lifetime; see `facilitator/warmup.rs`).
    pub(crate) async fn start(
        endpoint: Arc<HordeEndpoint>,
        store: JobStore,
        config: FacilitatorConfig,
        directory: Option<Arc<Directory>>,
        warm_up: Duration,
        cancel: CancellationToken,
    ) -> Result<RoleHandle, JobStoreError> {
        let hotkey = endpoint.hotkey();
        let hop = Hop {
            role: Role::Facilitator,
            hotkey,
        };
        let resumable = resume::recover(&store, &hop).await?;
        let excluded = store.exclusions().await?.into_iter().collect();
        let facilitator = Arc::new(Self {
            hotkey,
            peers: ConnectionCache::new(endpoint),
            store,
            validators: KnownPeers::new(
                Role::Validator,
                config.validators.clone(),
                directory.clone(),
            ),
            miners: KnownPeers::new(Role::Miner, config.miners.clone(), directory.clone()),
            warm_up: WarmUp::new(warm_up, directory.clone(), !config.miners.is_empty()),
            claims: Claims::default(),
            directory,
            config,
            live: Mutex::new(HashMap::new()),
            excluded: Mutex::new(excluded),
            next_miner: AtomicUsize::new(0),
            next_validator: AtomicUsize::new(0),
            unreachable: unreachable::Unreachable::default(),
            cancel: cancel.clone(),
            jobs: Mutex::new(ChildTasks::default()),
        });
        for job in resumable {
            facilitator.resume(job);
        }
        let service = Service::Facilitator(Arc::clone(&facilitator));
        let mut handle = RoleHandle::new(Role::Facilitator, service, cancel.clone());
        handle.spawn(async move {
            cancel.cancelled().await;
            let drivers = facilitator.lock_jobs().close();
            join_all(drivers).await;
        });
        Ok(handle)
    }

    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, ChildTasks> {
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serves one client connection: each stream is a submission or an attach.
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
        match first {
            ControlMessage::Down(DownMessage::Submit(spec)) => {
                self.handle_submit(peer, send, recv, spec).await;
            }
            ControlMessage::Down(DownMessage::Attach(job_id)) => {
                self.handle_attach(peer, send, recv, job_id).await;
            }
            ControlMessage::Report(report) => {
                let verdict = match self.accept_report(&report).await {
                    Ok(forwarded_to) => ReportVerdict::Accepted { forwarded_to },
                    Err(reason) => {
                        info!(%peer, %reason, "miner report refused");
                        ReportVerdict::Refused(reason.to_string())
                    }
                };
                let _ = send.send(&ControlMessage::ReportVerdict(verdict)).await;
                let _ = send.finish();
            }
            other => {
                warn!(%peer, message = ?other, "unexpected first message on a client stream");
                recv.stop(codes::PROTOCOL_VIOLATION);
                send.reset(codes::PROTOCOL_VIOLATION);
            }
        }
    }

    fn check_spec(&self, peer: &Hotkey, signed: &Signed<JobSpec>) -> Result<JobSpec, RejectReason> {
        let spec = signed.verify().map_err(|_| RejectReason::BadSignature)?;
        if signed.signer() != peer {
            // The account that signs the spec is the one that owns the job and may re-attach.
            return Err(RejectReason::NotOwner);
        }
        if let Some(allowed) = &self.config.allowed_clients
            && !allowed.contains(peer)
        {
            return Err(RejectReason::ClientNotAllowed);
        }
        if !spec.is_current(now(), MAX_CLOCK_SKEW_MS) {
            return Err(RejectReason::Expired);
        }
        // Everything that can be judged without an executor is judged now, not after a run.
        spec.check()
            .map_err(|error| RejectReason::InvalidSpec(error.to_string()))?;
        Ok(spec)
    }

    async fn handle_submit(
        self: Arc<Self>,
        peer: Hotkey,
        mut send: FramedSend,
        recv: FramedRecv,
        signed: Signed<JobSpec>,
    ) {
        let checked = self
            .check_spec(&peer, &signed)
            .and_then(|spec| self.refuse_while_warming_up(&spec).map(|()| spec));
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
        let received = match self
            .store
            .insert_job(signed.clone(), job_id, peer, now())
            .await
        {
            Ok(update) => update,
            Err(JobStoreError::Duplicate(_)) => {
                info!(%peer, job = %job_id.fmt_short(), "replayed job id refused");
                let _ = send
                    .send(&ControlMessage::Up(UpMessage::Rejected(
                        RejectReason::DuplicateJobId,
                    )))
                    .await;
                let _ = send.finish();
                return;
            }
            Err(error) => {
                // Nothing was stored, so nothing runs: the client is told why, not just reset.
                warn!(%error, "job store failed; job refused");
                let _ = send
                    .send(&ControlMessage::Up(UpMessage::Rejected(
                        RejectReason::StoreFailed(error.to_string()),
                    )))
                    .await;
                let _ = send.finish();
                return;
            }
        };
        let (statuses, live_rx) = broadcast::channel(LIVE_STATUS_BUFFER);
        let (down_tx, down_rx) = mpsc::channel(DOWN_QUEUE);
        let live = LiveJob {
            statuses,
            down: down_tx,
            owner: peer,
            // `Received` is status 0.
            unrecorded: unrecorded::Unrecorded::shared(1),
        };
        self.lock_live().insert(job_id, live.clone());
        info!(job = %job_id.fmt_short(), client = %peer, class = %spec.executor_class, "job received");

        let span = info_span!("job", job = %job_id.fmt_short());
        let driver = Arc::clone(&self);
        let driving = async move {
            driver.drive_job(job_id, signed, spec, live, down_rx).await;
        };
        let started = self.lock_jobs().spawn(driving.instrument(span.clone()));
        if started.is_err() {
            // Shutting down: the job ends here, as its driver would have ended it.
            let live = self.lock_live().remove(&job_id);
            if let Some(live) = live {
                let failure = self.hop().failed("facilitator shutting down");
                self.record(job_id, &live, JobStatus::HordeFailed(failure))
                    .await;
            }
        }
        self.serve_client(send, recv, job_id, vec![received], Some(live_rx), peer)
            .instrument(span)
            .await;
    }

    async fn handle_attach(
        self: Arc<Self>,
        peer: Hotkey,
        mut send: FramedSend,
        recv: FramedRecv,
        job_id: JobId,
    ) {
        let refuse = |reason| ControlMessage::Up(UpMessage::Rejected(reason));
        let record = match self.store.job(job_id).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                let _ = send.send(&refuse(RejectReason::UnknownJob)).await;
                let _ = send.finish();
                return;
            }
            Err(error) => {
                warn!(%error, "job store failed");
                send.reset(codes::INTERNAL);
                return;
            }
        };
        if record.owner != peer {
            let _ = send.send(&refuse(RejectReason::NotOwner)).await;
            let _ = send.finish();
            return;
        }
        // Subscribe, then take the statuses waiting for the store, then read the store's
        // history: a status is in one of the three whenever it moves from one to the next.
        let live = self.lock_live().get(&job_id).cloned();
        let live_rx = live.as_ref().map(|live| live.statuses.subscribe());
        let waiting = live
            .as_ref()
            .map(|live| live.unrecorded_after(None))
            .unwrap_or_default();
        let mut history = match self.store.history(job_id).await {
            Ok(history) => history,
            Err(error) => {
                warn!(%error, "job store failed");
                send.reset(codes::INTERNAL);
                return;
            }
        };
        let last = history.last().map(|update| update.seq);
        history.extend(
            waiting
                .into_iter()
                .filter(|update| last.is_none_or(|last| update.seq > last)),
        );
        debug!(job = %job_id.fmt_short(), statuses = history.len(), "client re-attached");
        self.serve_client(send, recv, job_id, history, live_rx, peer)
            .await;
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, LiveJob>> {
        // A poisoned lock only means another task panicked mid-insert; the map is still usable.
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pushes `history` then live statuses to the client, and passes the client's volume lists
    /// and terminate requests to the job's driver.
    async fn serve_client(
        &self,
        mut send: FramedSend,
        mut recv: FramedRecv,
        job_id: JobId,
        history: Vec<StatusUpdate>,
        live_rx: Option<broadcast::Receiver<StatusUpdate>>,
        owner: Hotkey,
    ) {
        let mut next_seq = 0u32;
        let mut ended = false;
        for update in history {
            next_seq = update.seq + 1;
            ended |= update.status.is_terminal();
            if send
                .send(&ControlMessage::Up(UpMessage::Status(update)))
                .await
                .is_err()
            {
                return;
            }
        }
        let Some(mut live_rx) = live_rx.filter(|_| !ended) else {
            let _ = send.finish();
            return;
        };
        let down = self.lock_live().get(&job_id).map(|live| live.down.clone());
        let mut client_open = true;
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => {
                    send.reset(codes::SHUTDOWN);
                    return;
                }
                update = live_rx.recv() => match update {
                    Ok(update) if update.seq < next_seq => continue,
                    Ok(update) => {
                        next_seq = update.seq + 1;
                        let terminal = update.status.is_terminal();
                        if send.send(&ControlMessage::Up(UpMessage::Status(update))).await.is_err() {
                            return;
                        }
                        if terminal {
                            let _ = send.finish();
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        warn!(missed, "client too slow for live statuses; it must re-attach");
                        send.reset(codes::BUSY);
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = send.finish();
                        return;
                    }
                },
                message = recv.recv::<ControlMessage>(), if client_open => match message {
                    Ok(Some(ControlMessage::Down(message))) => {
                        if let Err(reason) = message.check_from_owner(job_id, &owner) {
                            warn!(%reason, "client message refused");
                            continue;
                        }
                        if let Some(down) = &down
                            && down.send(message).await.is_err() {
                                debug!("job driver gone");
                            }
                    }
                    Ok(Some(other)) => {
                        warn!(message = ?other, "unexpected client message");
                        recv.stop(codes::PROTOCOL_VIOLATION);
                        client_open = false;
                    }
                    // The client finished its side; keep pushing statuses.
                    Ok(None) => client_open = false,
                    Err(error) => {
                        debug!(%error, "client stream ended");
                        return;
                    }
                },
            }
        }
    }

    /// Verifies a report end to end, records it (refusing duplicates), excludes the miner and
    /// forwards the report to every validator; returns how many validators accepted it.
    async fn accept_report(&self, signed: &Signed<MinerReport>) -> Result<u32, ReportRefusal> {
        let verified = self.check_report(signed).await?;
        let job_id = verified.report.job_id;
        match self
            .store
            .insert_report(signed.digest(), job_id, verified.receipt.stream, now())
            .await
        {
            Ok(()) => {}
            Err(JobStoreError::DuplicateReport(reason)) => {
                return Err(ReportRefusal::Duplicate(reason));
            }
            Err(error) => {
                warn!(%error, "job store failed");
                return Err(ReportRefusal::StoreFailed);
            }
        }
        let miner = verified.miner();
        let until = verified.exclusion_end(crate::clock::millis(self.config.exclusion), now());
        if let Err(error) = self.store.exclude(miner, until).await {
            warn!(%error, "could not persist the exclusion");
        }
        {
            let mut excluded = self.lock_excluded();
            let entry = excluded.entry(miner).or_insert(until);
            *entry = (*entry).max(until);
        }
        info!(job = %job_id.fmt_short(), %miner, reporter = %verified.reporter, until = until.0,
            details = %verified.report.details, "miner report verified; miner excluded");
        let mut forwarded_to = 0u32;
        for validator in &self.validators.list() {
            match self.forward_report(validator, signed).await {
                Ok(ReportVerdict::Accepted { .. }) => forwarded_to += 1,
                Ok(verdict) => {
                    warn!(validator = %validator.hotkey, ?verdict, "validator refused a verified report");
                }
                Err(error) => {
                    warn!(validator = %validator.hotkey, %error, "could not forward the report");
                }
            }
        }
        Ok(forwarded_to)
    }

    /// The whole chain: reporter signature, ownership, the assigned miner's endpoint record, the
    /// receipt under its job key.
    async fn check_report(
        &self,
        signed: &Signed<MinerReport>,
    ) -> Result<VerifiedReport, ReportRefusal> {
        let report = signed.verify().map_err(ReportRefusal::BadSignature)?;
        let job_id = report.job_id;
        if report.reported_at.0 > now().0.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(ReportRefusal::FromTheFuture);
        }
        let record = match self.store.job(job_id).await {
            Ok(Some(record)) => record,
            Ok(None) => return Err(ReportRefusal::UnknownJob(job_id)),
            Err(error) => {
                warn!(%error, "job store failed");
                return Err(ReportRefusal::ReadFailed);
            }
        };
        if record.owner != *signed.signer() {
            return Err(ReportRefusal::NotOwner {
                job_id,
                reporter: *signed.signer(),
                owner: record.owner,
            });
        }
        let history = self.store.history(job_id).await.map_err(|error| {
            warn!(%error, "job store failed");
            ReportRefusal::ReadFailed
        })?;
        let miner = history
            .iter()
            .rev()
            .find_map(|update| match &update.status {
                JobStatus::Assigned { miner, .. } => Some(*miner),
                _ => None,
            })
            .ok_or(ReportRefusal::NeverAssigned(job_id))?;
        Ok(verify_report(signed, Some(&miner))?)
    }

    async fn forward_report(
        &self,
        validator: &NodeAddr,
        signed: &Signed<MinerReport>,
    ) -> Result<ReportVerdict, ValidatorLinkError> {
        let exchange = async {
            let connection = self.peers.connect(validator, ALPN_CONTROL).await?;
            match request(&connection, &ControlMessage::Report(signed.clone())).await? {
                ControlMessage::ReportVerdict(verdict) => Ok(verdict),
                other => Err(ValidatorLinkError::Unexpected(other.name().to_owned())),
            }
        };
        tokio::time::timeout(REPORT_FORWARD_TIMEOUT, exchange)
            .await
            .map_err(|_| ValidatorLinkError::NoAnswer(REPORT_FORWARD_TIMEOUT))?
    }

    fn lock_excluded(&self) -> std::sync::MutexGuard<'_, HashMap<Hotkey, UnixMillis>> {
        self.excluded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `miner` may be given `spec`'s job: not excluded, and trusted if the job asks.
    fn may_run(&self, spec: &JobSpec, miner: &Hotkey, now: UnixMillis) -> bool {
        let excluded = self
            .lock_excluded()
            .get(miner)
            .is_some_and(|until| *until > now);
        !excluded && (!spec.on_trusted_miner || self.config.trusted_miners.contains(miner))
    }

    /// The miners a job may be given: a free executor of its class, and [`Self::may_run`].
    fn eligible_miners(&self, spec: &JobSpec) -> Vec<(NodeAddr, Option<(u32, u64)>)> {
        let now = now();
        self.miners
            .with_free_offers(&spec.executor_class)
            .into_iter()
            .filter(|(miner, _)| self.may_run(spec, &miner.hotkey, now))
            .collect()
    }

    /// Refuses a submission with `WarmingUp` (not stored) while the facilitator is still
    /// learning the network and knows no miner for the job, or no validator yet (see
    /// `facilitator/warmup.rs`): records arrive one by one, a miner's maybe before any
    /// validator's.
    fn refuse_while_warming_up(&self, spec: &JobSpec) -> Result<(), RejectReason> {
        let unknown = self.eligible_miners(spec).is_empty() || self.validators.list().is_empty();
        match self.warm_up.retry_after() {
            Some(retry) if unknown => Err(RejectReason::WarmingUp {
                retry_after_ms: u64::try_from(retry.as_millis()).unwrap_or(u64::MAX),
            }),
            _ => Ok(()),
        }
    }

    /// Why no miner could be given `spec`'s job: every executor of the class busy, or none.
    fn no_miner_reason(&self, spec: &JobSpec) -> RejectReason {
        let now = now();
        let executors = self
            .warm_up
            .executors_of(&spec.executor_class, |miner| self.may_run(spec, miner, now));
        if executors > 0 {
            RejectReason::AllBusy {
                class: spec.executor_class.clone(),
                executors,
            }
        } else {
            RejectReason::NoMiner
        }
    }

    /// Chooses a miner for `spec` and claims one of its free executors (`facilitator/claims.rs`:
    /// one just given to another job is not free, whatever a record not yet updated says).
    /// When none shows a free executor of the class, waits for one
    /// to free up (a released executor reaches the records within milliseconds) for at most
    /// [`MINER_WAIT_MAX`] or the spec's reservation deadline, whichever is shorter, before the
    /// job is refused with `NoMiner`.
    async fn wait_for_miner(&self, spec: &JobSpec) -> Option<NodeAddr> {
        let wait = MINER_WAIT_MAX.min(Duration::from_millis(spec.deadlines.reservation_ms));
        wait_for_records(self.miners.changes(), wait, || {
            let candidates = self
                .eligible_miners(spec)
                .into_iter()
                .map(|(miner, offered)| {
                    let hotkey = miner.hotkey;
                    (miner, hotkey, offered)
                })
                .collect();
            self.claims
                .choose_and_claim(&spec.executor_class, candidates, |peers| {
                    self.choose_miner(peers)
                })
        })
        .await
    }

    /// The round-robin position among `peers`.
    fn choose_miner(&self, peers: &[NodeAddr]) -> Option<usize> {
        if peers.is_empty() {
            return None;
        }
        Some(self.next_miner.fetch_add(1, Ordering::Relaxed) % peers.len())
    }

    fn hop(&self) -> Hop {
        Hop {
            role: Role::Facilitator,
            hotkey: self.hotkey,
        }
    }

    async fn drive_job(
        self: Arc<Self>,
        job_id: JobId,
        signed: Signed<JobSpec>,
        spec: JobSpec,
        live: LiveJob,
        mut down_rx: mpsc::Receiver<DownMessage>,
    ) {
        // A facilitator that stops leaves the job running (its validator drives it on) and
        // unfinished in the store: the next run resumes it.
        let final_status = tokio::select! {
            biased;
            () = self.cancel.cancelled() => None,
            status = self.drive_job_inner(job_id, signed, &spec, &live, &mut down_rx) => status,
        };
        if let Some(status) = final_status {
            self.record(job_id, &live, status).await;
        }
        self.settle(job_id, &live).await;
        self.lock_live().remove(&job_id);
        info!("job session over");
    }

    /// Runs the job's validator session; returns the terminal status to record if the session
    /// itself did not deliver one.
    async fn drive_job_inner(
        &self,
        job_id: JobId,
        signed: Signed<JobSpec>,
        spec: &JobSpec,
        live: &LiveJob,
        down_rx: &mut mpsc::Receiver<DownMessage>,
    ) -> Option<JobStatus> {
        let Some(miner) = self.wait_for_miner(spec).await else {
            return Some(JobStatus::Rejected(self.no_miner_reason(spec)));
        };
        // Try validators in turn, from a rotating position, those unreachable lately last.
        let mut session = None;
        let start = self.next_validator.fetch_add(1, Ordering::Relaxed);
        for validator in self.unreachable.in_turn(self.validators.list(), start) {
            match self.hand_over(&validator, job_id, &signed, &miner).await {
                Ok(opened) => {
                    self.unreachable.opened(&validator.hotkey);
                    session = Some((validator.hotkey, opened));
                    break;
                }
                Err(error) => self.unreachable.failed(&validator.hotkey, &error),
            }
        }
        let Some((validator, mut session)) = session else {
            self.claims.release(&miner.hotkey, &spec.executor_class);
            return Some(JobStatus::Rejected(RejectReason::NoValidator));
        };
        // Recorded before the validator may act on it: a job that can run is in the store.
        if self
            .record(
                job_id,
                live,
                JobStatus::Assigned {
                    validator,
                    miner: miner.hotkey,
                },
            )
            .await
        {
            return None;
        }
        if let Err(error) = session.send_down(&DownMessage::Proceed).await {
            // The relay below sees the broken stream and fails the job.
            debug!(%error, "could not tell the validator to proceed");
        }
        let leg = ValidatorLeg {
            validator,
            miner: miner.hotkey,
            session,
            recorded: Vec::new(),
        };
        self.relay_to_validator(job_id, spec, live, down_rx, leg)
            .await
    }
}
