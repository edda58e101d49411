//! The validator role: verifies a job and drives it against a miner, stage by stage.
//!
//! For each `Assign` from a facilitator it verifies the client's signature and the spec's expiry,
//! checks that the miner is one it knows (and trusts, for `on_trusted_miner` jobs), sends
//! `InitialDetails`, waits for the reservation and the executor's readiness, sends the full
//! client-signed spec, verifies the miner's signed endpoint record before forwarding it, then
//! relays volume lists and terminate requests down and results up. Every stage has its deadline
//! from the spec; the validator's own clock adds [`STAGE_SLACK`] so that the executor, which
//! enforces the same deadlines with more detail, normally reports first.

use std::sync::Arc;
use std::time::Duration;

use horde_protocol::messages::{
    Assignment, FailureReason, HordeFailure, InitialJobDetails, JobDetails, JobFailure,
    RejectReason,
};
use horde_protocol::{
    ControlMessage, DownMessage, Hotkey, JobId, JobSpec, NodeAddr, Role, Stage, UpMessage,
};
use horde_transport::{ALPN_CONTROL, FramedRecv, FramedSend, JobSession, codes, open_session};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::client::now;
use crate::config::ValidatorConfig;
use crate::peers::Peers;
use crate::peers::serve_streams;

/// Added to every stage deadline on the validator's clock (network and process start-up).
pub const STAGE_SLACK: Duration = Duration::from_secs(2);

/// The validator service.
#[derive(Debug)]
pub struct Validator {
    hotkey: Hotkey,
    peers: Peers,
    config: ValidatorConfig,
    cancel: CancellationToken,
}

impl Validator {
    /// The service.
    pub fn new(
        endpoint: Arc<horde_transport::HordeEndpoint>,
        config: ValidatorConfig,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            hotkey: endpoint.hotkey(),
            peers: Peers::new(endpoint),
            config,
            cancel,
        })
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
        let ControlMessage::Down(DownMessage::Assign(assignment)) = first else {
            warn!(%peer, "unexpected first message on a facilitator stream");
            recv.stop(codes::PROTOCOL_VIOLATION);
            send.reset(codes::PROTOCOL_VIOLATION);
            return;
        };
        let spec = match self.check_assignment(&peer, &assignment) {
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
        if spec.expires_at < now() {
            return Err(RejectReason::Expired);
        }
        if self.known_miner(&assignment.miner.hotkey).is_none() {
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

    fn known_miner(&self, hotkey: &Hotkey) -> Option<&NodeAddr> {
        self.config.miners.iter().find(|m| m.hotkey == *hotkey)
    }

    fn horde_failed(&self, reason: String) -> UpMessage {
        UpMessage::HordeFailed(HordeFailure {
            reported_by: Role::Validator,
            reporter: self.hotkey,
            reason,
        })
    }

    async fn drive(&self, mut upstream: JobSession, assignment: Assignment, spec: JobSpec) {
        let job_id = spec.job_id;
        let outcome = self.drive_inner(&mut upstream, &assignment, &spec).await;
        if let Some(message) = outcome
            && let Err(error) = upstream.send_up(&message).await
        {
            warn!(%error, "could not report to the facilitator");
        }
        let _ = upstream.finish();
        debug!(job = %job_id.fmt_short(), "job session over");
    }

    /// Drives the miner session; returns the final message to send up when the miner did not
    /// deliver one itself.
    async fn drive_inner(
        &self,
        upstream: &mut JobSession,
        assignment: &Assignment,
        spec: &JobSpec,
    ) -> Option<UpMessage> {
        let job_id = spec.job_id;
        // Dial the miner at the address we know, not the one we were told.
        let miner = self.known_miner(&assignment.miner.hotkey)?.clone();
        let connection = match self.peers.connect(&miner, ALPN_CONTROL).await {
            Ok(connection) => connection,
            Err(error) => {
                return Some(
                    self.horde_failed(format!("miner {} unreachable: {error}", miner.hotkey)),
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
        let mut downstream =
            match open_session(&connection, job_id, &DownMessage::InitialDetails(initial)).await {
                Ok(session) => session,
                Err(error) => {
                    return Some(self.horde_failed(format!("miner session failed: {error}")));
                }
            };
        let deadlines = spec.deadlines;
        let stage_limit = |stage: Stage| {
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
        };
        let mut stage = Stage::Reservation;
        let deadline = tokio::time::sleep(stage_limit(stage));
        tokio::pin!(deadline);
        let mut facilitator_open = true;
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => {
                    downstream.abort(codes::SHUTDOWN);
                    return Some(self.horde_failed("validator shutting down".to_owned()));
                }
                () = &mut deadline => {
                    warn!(?stage, "stage deadline passed");
                    downstream.abort(codes::CANCELLED);
                    return Some(UpMessage::Failed(JobFailure {
                        stage,
                        reason: FailureReason::Timeout,
                        result: None,
                    }));
                }
                message = downstream.recv() => {
                    let message = match message {
                        Ok(Some(ControlMessage::Up(message))) => message,
                        Ok(Some(other)) => {
                            warn!(message = ?other, "unexpected message from miner");
                            downstream.abort(codes::PROTOCOL_VIOLATION);
                            return Some(self.horde_failed("miner violated the protocol".to_owned()));
                        }
                        Ok(None) => {
                            return Some(self.horde_failed(format!(
                                "miner {} ended the job session without a result", miner.hotkey
                            )));
                        }
                        Err(error) => {
                            return Some(self.horde_failed(format!(
                                "miner {} link lost: {error}", miner.hotkey
                            )));
                        }
                    };
                    let forward = match (&stage, message) {
                        (Stage::Reservation, UpMessage::Accepted) => {
                            stage = Stage::ExecutorStartup;
                            deadline.as_mut().reset(tokio::time::Instant::now() + stage_limit(stage));
                            UpMessage::Accepted
                        }
                        (Stage::ExecutorStartup, UpMessage::ExecutorReady) => {
                            let details = JobDetails { spec: assignment.spec.clone() };
                            if let Err(error) = downstream.send_down(&DownMessage::FullDetails(details)).await {
                                return Some(self.horde_failed(format!("miner link lost: {error}")));
                            }
                            stage = Stage::VolumeDownload;
                            deadline.as_mut().reset(tokio::time::Instant::now() + stage_limit(stage));
                            UpMessage::ExecutorReady
                        }
                        (Stage::VolumeDownload, UpMessage::Endpoint(record)) => {
                            match record.verify_by(&miner.hotkey) {
                                Ok(content)
                                    if content.job_id == job_id
                                        && content.miner == miner.hotkey
                                        && content.expires_at >= now() => {}
                                Ok(_) | Err(_) => {
                                    warn!("miner's endpoint record does not verify");
                                    downstream.abort(codes::PROTOCOL_VIOLATION);
                                    return Some(UpMessage::Failed(JobFailure {
                                        stage: Stage::Readiness,
                                        reason: FailureReason::BadEndpointRecord(
                                            "not signed by the miner for this job, or expired".to_owned(),
                                        ),
                                        result: None,
                                    }));
                                }
                            }
                            stage = Stage::Execution;
                            deadline.as_mut().reset(tokio::time::Instant::now() + stage_limit(stage));
                            UpMessage::Endpoint(record)
                        }
                        (_, message @ (UpMessage::VolumesFetched { .. } | UpMessage::UploadDone(_))) => message,
                        (_, message @ (UpMessage::Declined(_)
                            | UpMessage::Finished(_)
                            | UpMessage::Failed(_)
                            | UpMessage::HordeFailed(_)
                            | UpMessage::Rejected(_))) => {
                            let _ = downstream.finish();
                            return Some(message);
                        }
                        (stage, message) => {
                            warn!(?stage, ?message, "miner message out of order");
                            downstream.abort(codes::PROTOCOL_VIOLATION);
                            return Some(self.horde_failed(format!(
                                "miner sent {message:?} during {stage:?}"
                            )));
                        }
                    };
                    if let Err(error) = upstream.send_up(&forward).await {
                        warn!(%error, "facilitator link lost; ending the job");
                        downstream.abort(codes::CANCELLED);
                        return None;
                    }
                }
                message = upstream.recv(), if facilitator_open => match message {
                    Ok(Some(ControlMessage::Down(message @ (DownMessage::Volumes(_) | DownMessage::Terminate(_))))) => {
                        if !self.client_message_ok(&message, job_id, assignment) {
                            continue;
                        }
                        if let Err(error) = downstream.send_down(&message).await {
                            return Some(self.horde_failed(format!("miner link lost: {error}")));
                        }
                    }
                    Ok(Some(other)) => warn!(message = ?other, "unexpected message from facilitator"),
                    Ok(None) => facilitator_open = false,
                    Err(error) => {
                        warn!(%error, "facilitator link lost; ending the job");
                        downstream.abort(codes::CANCELLED);
                        return None;
                    }
                },
            }
        }
    }

    /// Volume lists and terminate requests must be signed by the account that signed the spec.
    fn client_message_ok(
        &self,
        message: &DownMessage,
        job_id: JobId,
        assignment: &Assignment,
    ) -> bool {
        let owner = assignment.spec.signer();
        let ok = match message {
            DownMessage::Volumes(list) => list.verify_by(owner).is_ok_and(|l| l.job_id == job_id),
            DownMessage::Terminate(request) => {
                request.verify_by(owner).is_ok_and(|r| r.job_id == job_id)
            }
            _ => false,
        };
        if !ok {
            warn!("client message not signed by the job's owner; dropped");
        }
        ok
    }
}
