//! The client SDK: build and sign a job spec, submit it to a facilitator, follow its pushed
//! statuses, verify the miner's endpoint record, and reach the job directly.
//!
//! ```text
//! let client = Client::new(account_key, facilitator)?;
//! let mut job = client.submit(&JobRequest::command("cpu-small", "/usr/bin/my-job")).await?;
//! let endpoint = job.wait_for_endpoint().await?;      // verified against the chosen miner
//! let connection = job.connect_job(&endpoint).await?; // TLS pinned to the job key
//! ```
//!
//! A submission refused `WarmingUp` (a facilitator that has just started and knows no miner for
//! the class yet) is sent again when the facilitator says, until the spec's reservation
//! deadline; then the refusal is the job's status.
//!
//! A volume list or terminate request sent while the link to the facilitator is broken is sent
//! once the handle has attached again (it attaches at once when the send fails; a message written
//! into a link not yet known to be dead is sent again on the next attach, until the job confirms
//! it: `VolumesFetched`, or its end). Only when attaching fails for the whole window is it
//! refused, with a typed error.
//!
//! A [`JobHandle`] that loses its link to the facilitator (a facilitator restart, a network
//! outage) attaches to the job again by itself, with backoff, for up to [`REATTACH_WINDOW`]; the
//! statuses it had already seen are skipped in the replayed history, so the caller sees each one
//! once and in order.
//!
//! Cross-validation: [`compare_http`] runs one request on a job and on a trusted job and judges
//! the answers; a wrong answer becomes [`ReportEvidence`] (endpoint record + the job's receipt),
//! which [`Client::sign_report`] signs into a `MinerReport` and [`Client::report`] sends to the
//! facilitator, returning its [`ReportVerdict`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::client::{JobConnection, ReportEvidence, VerifiedEndpoint};
use crate::clock::now;
use horde_protocol::messages::{RejectReason, ReportVerdict, StatusUpdate};
use horde_protocol::{
    ControlMessage, Deadlines, DownMessage, ExecutorClass, Hotkey, JobId, JobSpec, JobStatus,
    MinerReport, NodeAddr, Program, ReadinessProbe, SecretKey, Signed, TerminateRequest,
    UnixMillis, UpMessage, UploadSpec, UploadTarget, VolumeList, VolumeSpec,
};
use horde_transport::tunnel::TunnelError;
use horde_transport::{
    ALPN_CONTROL, ChannelError, ClientPolicy, ConnectError, ConnectionCache, DialError,
    EndpointConfig, HordeEndpoint, JobSession, SessionError, open_session, split,
};

/// How long a [`JobHandle`] keeps trying to attach to its job again after its link to the
/// facilitator is lost, before it reports the loss: a facilitator restarts in seconds, and half
/// a minute also rides out a short network outage.
pub const REATTACH_WINDOW: Duration = Duration::from_secs(30);

/// The first pause between attach attempts, doubled after each failure up to
/// [`REATTACH_MAX_BACKOFF`]. (An attempt itself lasts until the facilitator answers or the
/// handshake times out, so a restarting facilitator is caught by the attempt's own retries.)
const REATTACH_FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest pause between attach attempts.
const REATTACH_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The shortest pause before submitting again to a facilitator that is warming up (whatever it
/// asks), so a client never spins on it.
const WARMUP_RETRY_MIN: Duration = Duration::from_millis(100);

/// How long a spec stays valid after signing unless the request says otherwise.
pub const DEFAULT_SPEC_LIFETIME: Duration = Duration::from_secs(600);

/// What a client asks for; turned into a signed [`JobSpec`] at submission.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// Executor class.
    pub executor_class: ExecutorClass,
    /// What to run.
    pub program: Program,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Staged deadlines.
    pub deadlines: Deadlines,
    /// Readiness probe.
    pub readiness: ReadinessProbe,
    /// Initial volumes.
    pub volumes: Vec<VolumeSpec>,
    /// Outputs uploaded at the end.
    pub uploads: Vec<UploadSpec>,
    /// Where stdout/stderr go.
    pub logs: Option<UploadTarget>,
    /// Run only on a trusted miner.
    pub on_trusted_miner: bool,
    /// How long the signed spec stays valid.
    pub lifetime: Duration,
}

impl JobRequest {
    /// A request to run `program` on `class`, with default deadlines and a `/health` probe.
    pub fn command(class: &str, program: &str) -> Self {
        Self {
            executor_class: ExecutorClass(class.to_owned()),
            program: Program::Command {
                program: program.to_owned(),
            },
            args: Vec::new(),
            env: Vec::new(),
            deadlines: Deadlines::default(),
            readiness: ReadinessProbe::default(),
            volumes: Vec::new(),
            uploads: Vec::new(),
            logs: None,
            on_trusted_miner: false,
            lifetime: DEFAULT_SPEC_LIFETIME,
        }
    }

    /// The spec for this request, with a fresh nonce.
    pub fn into_spec(self, job_id: JobId, client_key: Hotkey, now: UnixMillis) -> JobSpec {
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&JobId::random().0);
        JobSpec {
            job_id,
            executor_class: self.executor_class,
            program: self.program,
            args: self.args,
            env: self.env,
            deadlines: self.deadlines,
            readiness: self.readiness,
            volumes: self.volumes,
            uploads: self.uploads,
            logs: self.logs,
            client_key,
            on_trusted_miner: self.on_trusted_miner,
            nonce,
            issued_at: now,
            expires_at: now
                .plus_millis(u64::try_from(self.lifetime.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// A client operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The facilitator or job endpoint could not be reached.
    #[error("connect: {0}")]
    Connect(#[from] ConnectError),
    /// The local endpoint could not be set up.
    #[error("endpoint: {0}")]
    Endpoint(#[from] horde_transport::ConfigError),
    /// The session failed.
    #[error("session: {0}")]
    Session(#[from] SessionError),
    /// The stream failed.
    #[error("stream: {0}")]
    Channel(#[from] ChannelError),
    /// The facilitator closed the job stream before a terminal status.
    #[error("facilitator closed the job stream")]
    StreamClosed,
    /// The facilitator sent something a client never expects.
    #[error("unexpected message from the facilitator: {0}")]
    Unexpected(String),
    /// The job ended (or was refused) before the awaited status.
    #[error("job ended: {0:?}")]
    JobEnded(Box<JobStatus>),
    /// The endpoint record does not verify: the client refuses to connect.
    #[error("endpoint record refused: {0}")]
    BadEndpoint(String),
    /// A tunnel stream to the job failed.
    #[error("tunnel: {0}")]
    Tunnel(#[from] TunnelError),
    /// The facilitator could not be reached (a dial that other callers were waiting for).
    #[error("facilitator unreachable: {0}")]
    Unreachable(String),
    /// The facilitator refused the connection: this key already holds as many as it admits
    /// from one key (its `max_connections_per_peer`).
    #[error(
        "the facilitator admits no more connections from this key: end other clients using it, \
         or ask its operator to raise max_connections_per_peer"
    )]
    TooManyConnections,
    /// The spec breaks a rule that needs no executor to judge (the field is named).
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] horde_protocol::SpecFieldError),
    /// The facilitator did not answer a submit or attach in time, twice.
    #[error("no answer from the facilitator within {0:.1?}")]
    NoAnswer(Duration),
}

/// A client of one facilitator, with an account key. Clones share one connection to the
/// facilitator: every job, attach and report is a stream on it (DESIGN: many jobs share one
/// connection), so one client can run more jobs at once than the facilitator's per-key
/// connection cap, and only the first call pays for a handshake.
#[derive(Debug, Clone)]
pub struct Client {
    account: SecretKey,
    facilitator: NodeAddr,
    reattach_window: Duration,
    /// The shared connection (transport's one dialer): dialed on first use and again once it
    /// has closed or been forgotten; callers waiting for a dial share its outcome.
    link: ConnectionCache,
}

/// How long a submit or attach waits for a stream on the shared connection and the
/// facilitator's first answer on it (`Received`, a replayed status, or a refusal). Past it, or
/// when the stream breaks first, the connection is taken for dead (it may not know yet: a
/// facilitator that restarted, or one that refused the connection after its handshake) and the
/// request is sent once more on a new one. The facilitator persists with an fsync before it
/// answers, so 10 s is far above a healthy answer (a few ms).
const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

fn client_endpoint(key: &SecretKey) -> Result<HordeEndpoint, ClientError> {
    let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
    // A client never accepts connections; one slot keeps the listener side closed in practice.
    let config = EndpointConfig::new(bind, &[ALPN_CONTROL])
        .with_client_policy(ClientPolicy::Only(key.hotkey()))
        .with_max_connections(1);
    Ok(HordeEndpoint::bind(key, config)?)
}

impl Client {
    /// A client with `account` as its identity, talking to `facilitator`.
    pub fn new(account: SecretKey, facilitator: NodeAddr) -> Result<Self, ClientError> {
        let endpoint = Arc::new(client_endpoint(&account)?);
        Ok(Self {
            account,
            link: ConnectionCache::with_max_peers(endpoint, 1),
            facilitator,
            reattach_window: REATTACH_WINDOW,
        })
    }

    /// How long its job handles try to attach again after losing the status stream (default
    /// [`REATTACH_WINDOW`]; zero turns re-attaching off).
    pub fn with_reattach_window(mut self, window: Duration) -> Self {
        self.reattach_window = window;
        self
    }

    /// The account key.
    pub fn account(&self) -> Hotkey {
        self.account.hotkey()
    }

    /// The shared connection to the facilitator; dials one if there is none or it has closed.
    /// Callers wait for one dial rather than each making their own, and share its failure.
    async fn connect(&self) -> Result<quinn::Connection, ClientError> {
        match self.link.connect(&self.facilitator, ALPN_CONTROL).await {
            Ok(connection) => Ok(connection),
            Err(DialError::Connect(error)) => Err(match Arc::try_unwrap(error) {
                Ok(ConnectError::NoAddress) => {
                    ClientError::BadEndpoint("facilitator has no address".to_owned())
                }
                // The caller that dialed: the error itself.
                Ok(error) => ClientError::Connect(error),
                // A caller that waited for that dial: its failure, shared.
                Err(shared) => ClientError::Unreachable(shared.to_string()),
            }),
            Err(error) => Err(ClientError::Unreachable(error.to_string())),
        }
    }

    /// Drops `connection` as the shared one after a failure on it (it may be dead without
    /// knowing yet, e.g. the facilitator restarted), so the next call dials afresh.
    async fn forget(&self, connection: &quinn::Connection) {
        self.link.forget(connection);
    }

    /// Closes the shared connection and waits until the close has been sent (up to
    /// [`CLOSE_SEND_TIMEOUT`](horde_transport::CLOSE_SEND_TIMEOUT)), so the facilitator frees
    /// the connection's slot at once rather than at its idle timeout, without waiting out QUIC's
    /// draining period. Handles and clones of this client dial again if used afterwards. Call
    /// before a process exits.
    pub async fn close(&self) {
        let (code, reason) = (0u32.into(), b"client done");
        for connection in self.link.take_all() {
            horde_transport::close_promptly(&connection, code, reason).await;
        }
    }

    /// Opens a job session on the shared connection and reads the facilitator's first answer.
    /// If that fails (see [`FIRST_ANSWER_TIMEOUT`]), forgets the connection and tries once more
    /// on a new one. Returns whether the request went out twice.
    async fn session(
        &self,
        job_id: JobId,
        first: &DownMessage,
    ) -> Result<OpenedSession, ClientError> {
        let mut retried = false;
        loop {
            let connection = self.connect().await?;
            let attempt = async {
                let mut session = open_session(&connection, job_id, first).await?;
                match session.recv().await? {
                    Some(answer) => Ok((session, answer)),
                    None => Err(ClientError::StreamClosed),
                }
            };
            let error = match tokio::time::timeout(FIRST_ANSWER_TIMEOUT, attempt).await {
                Ok(Ok((session, answer))) => {
                    return Ok(OpenedSession {
                        session,
                        connection,
                        answer,
                        retried,
                    });
                }
                Ok(Err(error)) => error,
                Err(_) => ClientError::NoAnswer(FIRST_ANSWER_TIMEOUT),
            };
            self.forget(&connection).await;
            if let Some(quinn::ConnectionError::ApplicationClosed(close)) =
                connection.close_reason()
                && close.error_code == horde_transport::codes::TOO_MANY_CONNECTIONS
            {
                // A new connection would be refused the same way while the others are open.
                return Err(ClientError::TooManyConnections);
            }
            if retried {
                return Err(error);
            }
            tracing::debug!(job = %job_id.fmt_short(), %error, "no answer on the shared connection; trying a new one");
            retried = true;
        }
    }

    /// Signs and submits a job with a fresh job id and per-job client key.
    pub async fn submit(&self, request: &JobRequest) -> Result<JobHandle, ClientError> {
        let client_key = SecretKey::generate();
        self.submit_with(request, JobId::random(), client_key, now())
            .await
    }

    /// Submits with a given job id, client key and signing time (tests replay and expire specs
    /// this way).
    pub async fn submit_with(
        &self,
        request: &JobRequest,
        job_id: JobId,
        client_key: SecretKey,
        issued_at: UnixMillis,
    ) -> Result<JobHandle, ClientError> {
        let spec = request
            .clone()
            .into_spec(job_id, client_key.hotkey(), issued_at);
        // The facilitator checks the same; a spec that would only fail later is refused here,
        // before anything is sent.
        spec.check()?;
        let signed = Signed::sign(&self.account, &spec);
        self.submit_signed(signed, client_key).await
    }

    /// Submits an already signed spec.
    pub async fn submit_signed(
        &self,
        signed: Signed<JobSpec>,
        client_key: SecretKey,
    ) -> Result<JobHandle, ClientError> {
        let spec = signed
            .verify()
            .map_err(|e| ClientError::Unexpected(format!("own spec: {e}")))?;
        let job_id = spec.job_id;
        // A facilitator still learning the network refuses without storing the job: the same
        // signed spec goes again when it says, for as long as the reservation deadline allows.
        let reservation = Duration::from_millis(spec.deadlines.reservation_ms);
        let give_up = tokio::time::Instant::now() + reservation;
        let submit = DownMessage::Submit(signed);
        let mut opened = loop {
            let opened = self.session(job_id, &submit).await?;
            let ControlMessage::Up(UpMessage::Rejected(RejectReason::WarmingUp { retry_after_ms })) =
                opened.answer
            else {
                break opened;
            };
            let retry = Duration::from_millis(retry_after_ms).max(WARMUP_RETRY_MIN);
            if tokio::time::Instant::now() + retry >= give_up {
                break opened;
            }
            tracing::info!(job = %job_id.fmt_short(), retry_after_ms,
                "facilitator warming up; submitting again");
            tokio::time::sleep(retry).await;
        };
        if opened.retried
            && matches!(
                opened.answer,
                ControlMessage::Up(UpMessage::Rejected(RejectReason::DuplicateJobId))
            )
        {
            // The first try did arrive (only its answer was lost): follow that job.
            opened = self.attach_session(job_id).await?;
        }
        Ok(JobHandle::new(
            job_id,
            Some(client_key),
            opened,
            self.clone(),
        ))
    }

    /// Signs `evidence` into a miner report with the account key (the key that owns the job).
    pub fn sign_report(&self, evidence: ReportEvidence, details: &str) -> Signed<MinerReport> {
        evidence.sign(&self.account, details, now())
    }

    /// Sends a signed miner report to the facilitator on a new stream and returns its verdict.
    pub async fn report(&self, report: &Signed<MinerReport>) -> Result<ReportVerdict, ClientError> {
        let connection = self.connect().await?;
        let (send, recv) = match connection.open_bi().await {
            Ok(stream) => stream,
            Err(error) => {
                self.forget(&connection).await;
                return Err(ClientError::Unexpected(format!(
                    "opening a report stream: {error}"
                )));
            }
        };
        let (mut send, mut recv) = split(send, recv);
        send.send(&ControlMessage::Report(report.clone())).await?;
        send.finish()?;
        match recv.recv::<ControlMessage>().await? {
            Some(ControlMessage::ReportVerdict(verdict)) => Ok(verdict),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            None => Err(ClientError::StreamClosed),
        }
    }

    /// Re-attaches to a job after reconnecting; its history is replayed first.
    pub async fn attach(
        &self,
        job_id: JobId,
        client_key: Option<SecretKey>,
    ) -> Result<JobHandle, ClientError> {
        let opened = self.attach_session(job_id).await?;
        Ok(JobHandle::new(job_id, client_key, opened, self.clone()))
    }

    async fn attach_session(&self, job_id: JobId) -> Result<OpenedSession, ClientError> {
        self.session(job_id, &DownMessage::Attach(job_id)).await
    }
}

/// A job session whose first answer has arrived.
struct OpenedSession {
    session: JobSession,
    connection: quinn::Connection,
    /// The facilitator's first message on it, not yet taken in.
    answer: ControlMessage,
    /// The request was sent a second time, on a new connection.
    retried: bool,
}

/// One submitted (or attached) job: its status stream and the client's per-job key.
#[derive(Debug)]
pub struct JobHandle {
    job_id: JobId,
    client_key: Option<SecretKey>,
    session: JobSession,
    _connection: quinn::Connection,
    /// A message read ahead (a session's first answer), taken in before the next read.
    pending: Option<ControlMessage>,
    client: Client,
    miner: Option<Hotkey>,
    history: Vec<StatusUpdate>,
    ended: bool,
    /// Set while the status stream is being re-established: the re-attach window's end and the
    /// next backoff. Cleared by the first new status.
    reattaching: Option<(tokio::time::Instant, Duration)>,
    /// Volume lists and terminate requests sent and not yet confirmed (by `VolumesFetched` or
    /// the job's end): sent again on a stream attached again, so one written into a link that
    /// was already dead is delivered after the outage rather than lost.
    unconfirmed: Vec<DownMessage>,
}

impl JobHandle {
    fn new(
        job_id: JobId,
        client_key: Option<SecretKey>,
        opened: OpenedSession,
        client: Client,
    ) -> Self {
        Self {
            job_id,
            client_key,
            session: opened.session,
            _connection: opened.connection,
            pending: Some(opened.answer),
            client,
            miner: None,
            history: Vec::new(),
            ended: false,
            reattaching: None,
            unconfirmed: Vec::new(),
        }
    }

    /// The job id.
    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    /// The per-job client key (the only key the job endpoint accepts).
    pub fn client_key(&self) -> Option<&SecretKey> {
        self.client_key.as_ref()
    }

    /// Statuses received so far.
    pub fn history(&self) -> &[StatusUpdate] {
        &self.history
    }

    /// The miner chosen for the job, once assigned.
    pub fn miner(&self) -> Option<Hotkey> {
        self.miner
    }

    /// The next pushed status; `None` after a terminal one. A lost link to the facilitator is
    /// mended by attaching again (see the module docs); the error comes only when that fails
    /// for [`REATTACH_WINDOW`].
    pub async fn next_status(&mut self) -> Result<Option<StatusUpdate>, ClientError> {
        if self.ended {
            return Ok(None);
        }
        loop {
            let received = match self.pending.take() {
                Some(message) => Ok(Some(message)),
                None => self.session.recv().await,
            };
            let message = match received {
                Ok(Some(message)) => message,
                // The stream or its connection is gone, not the job.
                Ok(None) => {
                    self.reattach(ClientError::StreamClosed).await?;
                    continue;
                }
                Err(error @ (ChannelError::Read(_) | ChannelError::Io(_))) => {
                    self.reattach(error.into()).await?;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            if let Some(update) = self.accept_status(message)? {
                // The link works again: a later loss gets a whole window of its own.
                self.reattaching = None;
                return Ok(Some(update));
            }
        }
    }

    /// Attaches to the job again after `cause` broke the status stream. Attempts are spaced
    /// with a doubling backoff, and all attempts until a new status arrives share one
    /// [`REATTACH_WINDOW`] (a facilitator that accepts the attach and drops it again does not
    /// restart the window; a session that outlived the window does); past it, returns `cause`
    /// or the last attempt's error.
    async fn reattach(&mut self, cause: ClientError) -> Result<(), ClientError> {
        let (deadline, mut backoff) = match self.reattaching {
            // Still within the window of an earlier loss: a session that breaks again at once
            // (accepted, then dropped) does not get a fresh window.
            Some(window) if tokio::time::Instant::now() < window.0 => window,
            _ => {
                tracing::info!(job = %self.job_id.fmt_short(), error = %cause,
                    "status stream lost; attaching again");
                (
                    tokio::time::Instant::now() + self.client.reattach_window,
                    Duration::ZERO,
                )
            }
        };
        let mut last = cause;
        loop {
            if tokio::time::Instant::now() + backoff >= deadline {
                self.reattaching = None;
                return Err(last);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).clamp(REATTACH_FIRST_BACKOFF, REATTACH_MAX_BACKOFF);
            match tokio::time::timeout_at(deadline, self.client.attach_session(self.job_id)).await {
                Ok(Ok(opened)) => {
                    self.session = opened.session;
                    self._connection = opened.connection;
                    self.pending = Some(opened.answer);
                    self.reattaching = Some((deadline, backoff));
                    for message in &self.unconfirmed {
                        // A failure here breaks the new stream too; the next attach sends again.
                        if let Err(error) = self.session.send_down(message).await {
                            tracing::debug!(%error, "re-sending a client message failed");
                            break;
                        }
                    }
                    return Ok(());
                }
                Ok(Err(error)) => last = error,
                Err(_) => {
                    self.reattaching = None;
                    return Err(last);
                }
            }
        }
    }

    /// Whether `update` is one this handle has seen: the same status (a job's statuses never
    /// repeat). Not by its number alone: a facilitator whose store refused statuses (its disk
    /// full) sends them under the numbers the store will give them, and if it restarts before
    /// storing them, later statuses come under those numbers again (new, and taken), and the
    /// validator sends the lost ones again (stored anew, under new numbers and times: seen).
    fn seen(&self, update: &StatusUpdate) -> bool {
        let same = |seen: &StatusUpdate| seen.status == update.status;
        let at_its_number = usize::try_from(update.seq)
            .ok()
            .and_then(|seq| self.history.get(seq));
        at_its_number.is_some_and(same) || self.history.iter().any(same)
    }

    /// Takes in one message of the status stream: the status it carries, or `None` for one
    /// already seen (replayed after attaching again).
    fn accept_status(
        &mut self,
        message: ControlMessage,
    ) -> Result<Option<StatusUpdate>, ClientError> {
        let update = match message {
            ControlMessage::Up(UpMessage::Status(update)) => {
                if self.seen(&update) {
                    return Ok(None);
                }
                update
            }
            // Refused on a session attached again (unknown job, not the owner): the job itself
            // was not rejected, the re-attach was.
            ControlMessage::Up(UpMessage::Rejected(reason)) if self.reattaching.is_some() => {
                self.reattaching = None;
                return Err(ClientError::Unexpected(format!(
                    "attaching again to job {} was refused: {reason:?}",
                    self.job_id
                )));
            }
            ControlMessage::Up(UpMessage::Rejected(reason)) => StatusUpdate {
                job_id: self.job_id,
                seq: u32::try_from(self.history.len()).unwrap_or(u32::MAX),
                at: now(),
                status: JobStatus::Rejected(reason),
            },
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        if update.job_id != self.job_id {
            return Err(ClientError::Unexpected(format!(
                "status for job {}",
                update.job_id
            )));
        }
        match &update.status {
            JobStatus::Assigned { miner, .. } => self.miner = Some(*miner),
            JobStatus::VolumesFetched { volume_msg_id } => self.unconfirmed.retain(|sent| {
                !matches!(sent, DownMessage::Volumes(list)
                    if list.verify().is_ok_and(|list| list.volume_msg_id == *volume_msg_id))
            }),
            _ => {}
        }
        if update.status.is_terminal() {
            self.ended = true;
            self.unconfirmed.clear();
        }
        self.history.push(update.clone());
        Ok(Some(update))
    }

    /// Reads statuses until the endpoint is ready and verifies its record against the assigned
    /// miner. A record that fails verification is refused: no connection is made.
    pub async fn wait_for_endpoint(&mut self) -> Result<VerifiedEndpoint, ClientError> {
        if let Some(verified) = self.verified_endpoint_in_history()? {
            return Ok(verified);
        }
        while let Some(update) = self.next_status().await? {
            match update.status {
                JobStatus::EndpointReady(signed) => {
                    let miner = self.miner.ok_or_else(|| {
                        ClientError::BadEndpoint("endpoint before any miner was assigned".into())
                    })?;
                    return VerifiedEndpoint::verify(&signed, self.job_id, &miner, now());
                }
                status if status.is_terminal() => {
                    return Err(ClientError::JobEnded(Box::new(status)));
                }
                _ => {}
            }
        }
        Err(ClientError::StreamClosed)
    }

    fn verified_endpoint_in_history(&self) -> Result<Option<VerifiedEndpoint>, ClientError> {
        for update in &self.history {
            if let JobStatus::EndpointReady(signed) = &update.status {
                let miner = self
                    .miner
                    .ok_or_else(|| ClientError::BadEndpoint("no miner assigned".into()))?;
                return VerifiedEndpoint::verify(signed, self.job_id, &miner, now()).map(Some);
            }
        }
        Ok(None)
    }

    /// Reads statuses until a terminal one and returns it.
    pub async fn wait_for_end(&mut self) -> Result<JobStatus, ClientError> {
        if let Some(last) = self.history.last().filter(|u| u.status.is_terminal()) {
            return Ok(last.status.clone());
        }
        while let Some(update) = self.next_status().await? {
            if update.status.is_terminal() {
                return Ok(update.status);
            }
        }
        Err(ClientError::StreamClosed)
    }

    /// Reads statuses until `predicate` matches one (returned) or the job ends (an error).
    pub async fn wait_for(
        &mut self,
        mut predicate: impl FnMut(&JobStatus) -> bool,
    ) -> Result<JobStatus, ClientError> {
        while let Some(update) = self.next_status().await? {
            if predicate(&update.status) {
                return Ok(update.status);
            }
            if update.status.is_terminal() {
                return Err(ClientError::JobEnded(Box::new(update.status)));
            }
        }
        Err(ClientError::StreamClosed)
    }

    /// Sends a signed volume list down to the executor.
    pub async fn send_volumes(
        &mut self,
        volume_msg_id: u64,
        fetch: Vec<VolumeSpec>,
        upload: Vec<UploadSpec>,
    ) -> Result<(), ClientError> {
        let list = VolumeList {
            job_id: self.job_id,
            volume_msg_id,
            fetch,
            upload,
        };
        let signed = Signed::sign(&self.client.account, &list);
        self.deliver(DownMessage::Volumes(signed)).await
    }

    /// Asks for the job to end.
    pub async fn terminate(&mut self) -> Result<(), ClientError> {
        let request = TerminateRequest {
            job_id: self.job_id,
            issued_at: now(),
        };
        let signed = Signed::sign(&self.client.account, &request);
        self.deliver(DownMessage::Terminate(signed)).await
    }

    /// Sends a client message down and keeps it until the job confirms it. A link found broken
    /// (a facilitator restart) is mended first, by attaching again within the re-attach window:
    /// the message goes on the new stream. Only when that fails is the message refused, with
    /// the error.
    async fn deliver(&mut self, message: DownMessage) -> Result<(), ClientError> {
        if let Err(error) = self.session.send_down(&message).await {
            if self.ended {
                return Err(error.into());
            }
            self.unconfirmed.push(message);
            if let Err(error) = self.reattach(error.into()).await {
                self.unconfirmed.pop();
                return Err(error);
            }
            return Ok(());
        }
        self.unconfirmed.push(message);
        Ok(())
    }

    /// Connects to the job endpoint with the per-job client key, pinned to the verified job key.
    pub async fn connect_job(
        &self,
        endpoint: &VerifiedEndpoint,
    ) -> Result<JobConnection, ClientError> {
        let key = self
            .client_key
            .clone()
            .ok_or_else(|| ClientError::BadEndpoint("no client key for this job".into()))?;
        JobConnection::connect(self.job_id, key, endpoint).await
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use horde_protocol::messages::StatusUpdate;
    use horde_transport::test_utils::{localhost_endpoint, seeded_key};
    use horde_transport::{FramedSend, accept_stream};

    use super::*;

    /// A fake facilitator on `facilitator` (key `seeded_key(2)`, on loopback) and a client of it
    /// (key `seeded_key(1)`): each connection is shown to `on_connection`, and each stream's
    /// first message is served by `serve` with the stream's send half, in a task of its own (a
    /// session that stays open holds its send half).
    fn fake_facilitator<S, F>(
        facilitator: HordeEndpoint,
        on_connection: impl Fn(&quinn::Connection) + Send + 'static,
        serve: S,
    ) -> Client
    where
        S: Fn(ControlMessage, FramedSend) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let addr = facilitator.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(Ok(horde_transport::IncomingConnection { connection, .. })) =
                facilitator.accept().await
            {
                on_connection(&connection);
                let serve = serve.clone();
                tokio::spawn(async move {
                    while let Ok(Some((send, _recv, first))) = accept_stream(&connection).await {
                        tokio::spawn(serve(first, send));
                    }
                });
            }
        });
        Client::new(seeded_key(1), NodeAddr::new(seeded_key(2).hotkey(), addr)).unwrap()
    }

    /// Status `seq`, at a time of its own (as a facilitator stores it: replayed the same).
    fn status(job_id: JobId, seq: u32, status: JobStatus) -> ControlMessage {
        ControlMessage::Up(UpMessage::Status(StatusUpdate {
            job_id,
            seq,
            at: UnixMillis(1_000 + u64::from(seq)),
            status,
        }))
    }

    /// Submits a trivial job and checks its first status is `Received`.
    async fn submitted(client: &Client) -> JobHandle {
        let mut job = client
            .submit(&JobRequest::command("cpu", "/bin/true"))
            .await
            .unwrap();
        let first = job.next_status().await.unwrap().unwrap();
        assert_eq!(first.status, JobStatus::Received);
        job
    }

    /// Jobs, attaches and reports of one client share one connection to the facilitator: more
    /// jobs than its per-key connection cap run at once, and a closed connection is replaced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_share_one_connection_and_a_closed_one_is_replaced() {
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = Arc::clone(&connections);
        let client = fake_facilitator(
            localhost_endpoint(&seeded_key(2)),
            move |connection| accepted.lock().unwrap().push(connection.clone()),
            |first, mut send| async move {
                let ControlMessage::Down(DownMessage::Submit(signed)) = first else {
                    return;
                };
                let job_id = signed.verify().unwrap().job_id;
                send.send(&status(job_id, 0, JobStatus::Received))
                    .await
                    .unwrap();
                // The job stays open: its stream is held until the test ends.
                tokio::time::sleep(Duration::from_secs(60)).await;
            },
        );
        let jobs = horde_transport::DEFAULT_MAX_CONNECTIONS_PER_PEER + 4;
        let mut handles = Vec::new();
        for _ in 0..jobs {
            handles.push(submitted(&client).await);
        }
        assert_eq!(
            connections.lock().unwrap().len(),
            1,
            "{jobs} jobs, one connection"
        );

        // The facilitator closes it (as on a restart): the next submit dials a new one.
        let first = connections.lock().unwrap()[0].clone();
        first.close(0u32.into(), b"restart");
        first.closed().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while handles[0]._connection.close_reason().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "close never seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        submitted(&client).await;
        assert_eq!(connections.lock().unwrap().len(), 2);
    }

    /// A client whose connection the facilitator refuses for its per-key cap gets a typed error
    /// saying so, not a broken stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_over_the_per_key_cap_is_a_typed_error() {
        let facilitator = HordeEndpoint::bind(
            &seeded_key(2),
            horde_transport::test_utils::localhost_config().with_max_connections_per_peer(1),
        )
        .unwrap();
        let first = fake_facilitator(
            facilitator,
            |_| {},
            |first, mut send| async move {
                if let ControlMessage::Down(DownMessage::Submit(signed)) = first {
                    let job_id = signed.verify().unwrap().job_id;
                    send.send(&status(job_id, 0, JobStatus::Received))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            },
        );
        let _held = submitted(&first).await;
        // Another client of the same key: a second connection, one over the cap.
        let second = Client::new(seeded_key(1), first.facilitator.clone()).unwrap();
        let error = second
            .submit(&JobRequest::command("cpu", "/bin/true"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ClientError::TooManyConnections),
            "{error:?}"
        );
    }

    /// A submit whose answer is lost (the stream breaks before it) is sent again on a new
    /// connection; when the facilitator answers that it has the job already, the client
    /// follows it by attaching, instead of returning a handle to a job nobody answered for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_submit_whose_answer_is_lost_is_resent_and_then_attached() {
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        let known = Arc::new(std::sync::Mutex::new(None::<JobId>));
        let client = fake_facilitator(
            localhost_endpoint(&seeded_key(2)),
            move |_| {
                counted.fetch_add(1, Ordering::Relaxed);
            },
            move |first, mut send| {
                let known = Arc::clone(&known);
                async move {
                    match first {
                        ControlMessage::Down(DownMessage::Submit(signed)) => {
                            let job_id = signed.verify().unwrap().job_id;
                            if known.lock().unwrap().replace(job_id).is_some() {
                                let refusal = RejectReason::DuplicateJobId;
                                let refusal = ControlMessage::Up(UpMessage::Rejected(refusal));
                                send.send(&refusal).await.unwrap();
                            } else {
                                // Taken in, but the answer is lost.
                                send.reset(horde_transport::codes::INTERNAL);
                            }
                        }
                        ControlMessage::Down(DownMessage::Attach(job_id)) => {
                            let history = [JobStatus::Received, JobStatus::Accepted];
                            for (seq, update) in (0..).zip(history) {
                                send.send(&status(job_id, seq, update)).await.unwrap();
                            }
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                        _ => {}
                    }
                }
            },
        );
        let mut job = submitted(&client).await;
        let second = job.next_status().await.unwrap().unwrap();
        assert_eq!(second.status, JobStatus::Accepted);
        assert_eq!(
            connections.load(Ordering::Relaxed),
            2,
            "resent on a new connection"
        );
    }

    /// A facilitator whose store refused statuses (its disk full) sent them under the numbers
    /// the store would give them, then restarted without them: after attaching again, the
    /// replayed statuses are skipped and a new status under a number seen before is taken (the
    /// handle used to drop it as seen, and waited for an end it had been sent).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_status_under_a_number_seen_before_is_taken() {
        let client = fake_facilitator(
            localhost_endpoint(&seeded_key(2)),
            |_| {},
            move |first, mut send| async move {
                let (job_id, statuses) = match first {
                    ControlMessage::Down(DownMessage::Submit(signed)) => {
                        let job_id = signed.verify().unwrap().job_id;
                        let sent = [
                            JobStatus::Received,
                            JobStatus::Accepted,
                            JobStatus::ExecutorReady,
                        ];
                        (job_id, sent.to_vec())
                    }
                    ControlMessage::Down(DownMessage::Attach(job_id)) => {
                        let ended = JobStatus::Rejected(RejectReason::NoMiner);
                        (
                            job_id,
                            vec![JobStatus::Received, JobStatus::Accepted, ended],
                        )
                    }
                    _ => return,
                };
                for (seq, update) in (0..).zip(statuses) {
                    send.send(&status(job_id, seq, update)).await.unwrap();
                }
                let _ = send.finish();
            },
        );
        let mut job = submitted(&client).await;
        let mut seen = Vec::new();
        while let Some(update) = job.next_status().await.unwrap() {
            seen.push((update.seq, update.status));
        }
        let ended = JobStatus::Rejected(RejectReason::NoMiner);
        assert_eq!(
            seen,
            vec![
                (1, JobStatus::Accepted),
                (2, JobStatus::ExecutorReady),
                (2, ended)
            ]
        );
    }

    /// A facilitator that answers the submit with one status and then drops every stream,
    /// attaches included: the handle re-attaches with backoff, within one window in all, and
    /// then reports the loss, rather than re-attaching forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn re_attaching_gives_up_after_one_window_when_every_attach_is_dropped() {
        let attaches = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&attaches);
        let client = fake_facilitator(
            localhost_endpoint(&seeded_key(2)),
            |_| {},
            move |first, mut send| {
                let counted = Arc::clone(&counted);
                async move {
                    if let ControlMessage::Down(DownMessage::Submit(signed)) = first {
                        let job_id = signed.verify().unwrap().job_id;
                        send.send(&status(job_id, 0, JobStatus::Received))
                            .await
                            .unwrap();
                        // Ended without a terminal status (a reset could discard it).
                        let _ = send.finish();
                    } else {
                        counted.fetch_add(1, Ordering::Relaxed);
                        send.reset(horde_transport::codes::INTERNAL);
                    }
                }
            },
        )
        .with_reattach_window(Duration::from_secs(1));
        let mut job = submitted(&client).await;
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), job.next_status())
            .await
            .expect("the handle gives up instead of re-attaching forever");
        assert!(result.is_err(), "{result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // Backoff 0, 0.1, 0.2, 0.4 s … within one second, each attempt sent at most twice (once
        // more on a new connection): a handful of attaches, not hundreds.
        let attempts = attaches.load(Ordering::Relaxed);
        assert!((1..=16).contains(&attempts), "{attempts} attaches");
    }
}
