//! The relay loop of one hop: a job session's messages go down (client → executor: volume lists,
//! terminate requests, the full details) and up (executor → client: statuses), under the node's
//! cancellation and a stage deadline, with link loss handled the same way on every hop.
//!
//! The facilitator, the validator and the miner each run one [`Relay`] per job. What a role checks
//! or changes on the way is its [`RelayPolicy`]: each message becomes a [`Step`] (forward it, end
//! the job with it, fail the job, or drop it), and the relay carries the step out. [`Hop`] names
//! the node that relays, for the `HordeFailed` reports it makes.

use horde_protocol::messages::{FailureReason, HordeFailure, JobFailure};
use horde_protocol::{
    ControlMessage, DownMessage, EndpointRecord, Hotkey, JobId, Role, Signed, Stage, UnixMillis,
    UpMessage,
};
use horde_transport::{ChannelError, JobSession, codes};
use quinn::VarInt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The node relaying a job: its role and hotkey, as `HordeFailed` reports name them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hop {
    /// The relaying node's role.
    pub(crate) role: Role,
    /// The relaying node's hotkey.
    pub(crate) hotkey: Hotkey,
}

impl Hop {
    /// A failure of the network itself (not the job's), reported by this hop.
    pub(crate) fn failed(&self, reason: impl Into<String>) -> HordeFailure {
        HordeFailure {
            reported_by: self.role,
            reporter: self.hotkey,
            reason: reason.into(),
        }
    }

    /// [`Hop::failed`] as the message that reports it up.
    pub(crate) fn failed_up(&self, reason: impl Into<String>) -> UpMessage {
        UpMessage::HordeFailed(self.failed(reason))
    }
}

/// What the relay does with a message (or a passed deadline), as a role's policy decides.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send this down to the next hop.
    Down(DownMessage),
    /// Send this up to the previous hop. A message that ends the job ([`ends_job`]) ends the
    /// relay as [`Step::End`] does.
    Up(UpMessage),
    /// Send `.0` down, then `.1` up (the validator's full details once the executor is ready).
    DownThenUp(DownMessage, UpMessage),
    /// The job ended with this message: finish the next hop's session and report it up.
    End(UpMessage),
    /// The job failed: abort the next hop's session with `code` and report `message` up.
    Fail {
        /// The application error code for the next hop.
        code: VarInt,
        /// What the previous hop is told.
        message: UpMessage,
    },
    /// Nothing to relay (the policy logged why).
    Drop,
}

/// A role's part in the relay: what it checks and changes on the way, and its deadline.
pub(crate) trait RelayPolicy {
    /// A message from the next hop, on its way to the client.
    fn on_up(&mut self, message: UpMessage) -> Step;
    /// A message from the previous hop, on its way to the executor.
    fn on_down(&mut self, message: DownMessage) -> Step;
    /// When the current stage must be over; `None`: no deadline.
    fn deadline(&self) -> Option<Instant>;
    /// The deadline passed.
    fn on_deadline(&mut self) -> Step;
}

/// The previous hop's side of a job: where down messages come from and up messages go.
pub(crate) trait Upstream {
    /// The next message from the previous hop; `None` once it finished its side. Cancel-safe.
    async fn recv(&mut self) -> Result<Option<ControlMessage>, ChannelError>;
    /// Sends `message` toward the client.
    async fn send(&mut self, message: &UpMessage) -> Result<(), ChannelError>;
}

impl Upstream for JobSession {
    async fn recv(&mut self) -> Result<Option<ControlMessage>, ChannelError> {
        JobSession::recv(self).await
    }

    async fn send(&mut self, message: &UpMessage) -> Result<(), ChannelError> {
        self.send_up(message).await
    }
}

/// Whether `message` is a job's last: after it nothing more comes up.
pub(crate) fn ends_job(message: &UpMessage) -> bool {
    matches!(
        message,
        UpMessage::Declined(_)
            | UpMessage::Finished(_)
            | UpMessage::Failed(_)
            | UpMessage::HordeFailed(_)
            | UpMessage::Rejected(_)
    )
}

/// Whether the miner's endpoint record for `job_id` holds: signed by `miner`, naming that job
/// and that miner, not expired at `now`. Facilitator and validator both check, as the client does.
pub(crate) fn endpoint_record_holds(
    record: &Signed<EndpointRecord>,
    job_id: JobId,
    miner: &Hotkey,
    now: UnixMillis,
) -> bool {
    record.verify_by(miner).is_ok_and(|content| {
        content.job_id == job_id && content.miner == *miner && content.expires_at >= now
    })
}

/// The step for an endpoint record that does not hold ([`endpoint_record_holds`]): the job fails
/// at its readiness and the miner's session is aborted as a protocol violation.
pub(crate) fn bad_endpoint_record() -> Step {
    Step::Fail {
        code: codes::PROTOCOL_VIOLATION,
        message: UpMessage::Failed(JobFailure {
            stage: Stage::Readiness,
            reason: FailureReason::BadEndpointRecord(
                "not signed by the chosen miner for this job, or expired".to_owned(),
            ),
            result: None,
        }),
    }
}

/// One job's relay on one hop: owns the session to the next hop.
#[derive(Debug)]
pub(crate) struct Relay<'a> {
    hop: Hop,
    /// The next hop, as failure reasons name it ("miner 5F…", "executor").
    next: String,
    /// The previous hop, as logs name it ("facilitator", "validator").
    previous: &'static str,
    downstream: JobSession,
    cancel: &'a CancellationToken,
}

impl<'a> Relay<'a> {
    /// A relay by `hop` onto `downstream` (the session to the hop named `next`), for the job
    /// coming from the hop named `previous`, until `cancel`.
    pub(crate) fn new(
        hop: Hop,
        next: String,
        previous: &'static str,
        downstream: JobSession,
        cancel: &'a CancellationToken,
    ) -> Self {
        Self {
            hop,
            next,
            previous,
            downstream,
            cancel,
        }
    }

    /// Relays until the job ends. Returns the last message for the previous hop, not sent yet:
    /// the job's end, or why the relay ended it; `None` when the previous hop is gone (the next
    /// hop's session is then aborted with [`codes::CANCELLED`]).
    ///
    /// Cancellation ends the job `HordeFailed` (the next hop aborted with [`codes::SHUTDOWN`]);
    /// a message on the wrong side from the next hop is a protocol violation; a next hop that
    /// ends its session or loses its link without a last message ends the job `HordeFailed`.
    pub(crate) async fn run(
        mut self,
        upstream: &mut impl Upstream,
        policy: &mut impl RelayPolicy,
    ) -> Option<UpMessage> {
        let mut upstream_open = true;
        let deadline = tokio::time::sleep_until(policy.deadline().unwrap_or_else(Instant::now));
        tokio::pin!(deadline);
        loop {
            let current = policy.deadline();
            if let Some(at) = current
                && at != deadline.deadline()
            {
                deadline.as_mut().reset(at);
            }
            let step = tokio::select! {
                biased;
                () = self.cancel.cancelled() => Step::Fail {
                    code: codes::SHUTDOWN,
                    message: self.hop.failed_up(format!("{} shutting down", self.hop.role)),
                },
                () = &mut deadline, if current.is_some() => policy.on_deadline(),
                message = self.downstream.recv() => match message {
                    Ok(Some(ControlMessage::Up(message))) => policy.on_up(message),
                    Ok(Some(other)) => {
                        warn!(message = ?other, next = %self.next, "unexpected message from the next hop");
                        Step::Fail {
                            code: codes::PROTOCOL_VIOLATION,
                            message: self.hop.failed_up(format!("{} violated the protocol", self.next)),
                        }
                    }
                    Ok(None) => {
                        return Some(self.hop.failed_up(format!(
                            "{} ended the job session without a result", self.next
                        )));
                    }
                    Err(error) => {
                        return Some(self.hop.failed_up(format!("{} link lost: {error}", self.next)));
                    }
                },
                message = upstream.recv(), if upstream_open => match message {
                    Ok(Some(ControlMessage::Down(message))) => policy.on_down(message),
                    Ok(Some(other)) => {
                        warn!(message = ?other, previous = self.previous, "unexpected message from the previous hop");
                        Step::Drop
                    }
                    Ok(None) => {
                        upstream_open = false;
                        Step::Drop
                    }
                    Err(error) => {
                        warn!(%error, previous = self.previous, "link to the previous hop lost; ending the job");
                        self.downstream.abort(codes::CANCELLED);
                        return None;
                    }
                },
            };
            if let Some(end) = self.carry_out(step, upstream).await {
                return end;
            }
        }
    }

    /// Carries out `step`; `Some(end)` when it ended the relay with `end` (see [`Relay::run`]).
    async fn carry_out(
        &mut self,
        step: Step,
        upstream: &mut impl Upstream,
    ) -> Option<Option<UpMessage>> {
        let up = match step {
            Step::Drop => return None,
            Step::Down(message) => return self.send_down(&message).await,
            Step::DownThenUp(down, up) => {
                if let Some(end) = self.send_down(&down).await {
                    return Some(end);
                }
                up
            }
            Step::Up(message) => message,
            Step::End(message) => {
                let _ = self.downstream.finish();
                return Some(Some(message));
            }
            Step::Fail { code, message } => {
                self.downstream.abort(code);
                return Some(Some(message));
            }
        };
        if ends_job(&up) {
            let _ = self.downstream.finish();
            return Some(Some(up));
        }
        if let Err(error) = upstream.send(&up).await {
            warn!(%error, previous = self.previous, "link to the previous hop lost; ending the job");
            self.downstream.abort(codes::CANCELLED);
            return Some(None);
        }
        None
    }

    async fn send_down(&mut self, message: &DownMessage) -> Option<Option<UpMessage>> {
        match self.downstream.send_down(message).await {
            Ok(()) => None,
            Err(error) => Some(Some(
                self.hop
                    .failed_up(format!("{} link lost: {error}", self.next)),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use horde_protocol::messages::{DeclineReason, RejectReason};
    use horde_transport::test_utils::{connected_pair, seeded_key};
    use horde_transport::{FramedSend, accept_stream, open_session};
    use tokio::sync::mpsc;

    use super::*;

    const JOB: JobId = JobId([9; 16]);

    /// Forwards everything; its deadline, when set, fails the job.
    struct PassThrough {
        deadline: Option<Instant>,
    }

    impl RelayPolicy for PassThrough {
        fn on_up(&mut self, message: UpMessage) -> Step {
            Step::Up(message)
        }
        fn on_down(&mut self, message: DownMessage) -> Step {
            Step::Down(message)
        }
        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }
        fn on_deadline(&mut self) -> Step {
            Step::Fail {
                code: codes::CANCELLED,
                message: UpMessage::Rejected(RejectReason::Expired),
            }
        }
    }

    /// The previous hop: what it sent up, and a queue of nothing (it stays open).
    struct Recorder {
        sent: Vec<UpMessage>,
        down: mpsc::Receiver<DownMessage>,
    }

    impl Upstream for Recorder {
        async fn recv(&mut self) -> Result<Option<ControlMessage>, ChannelError> {
            Ok(self.down.recv().await.map(ControlMessage::Down))
        }
        async fn send(&mut self, message: &UpMessage) -> Result<(), ChannelError> {
            self.sent.push(message.clone());
            Ok(())
        }
    }

    /// Runs a relay with `policy` against a next hop that sends `messages`; returns the relay's
    /// last message and what it sent up before.
    async fn relay_against(
        messages: Vec<ControlMessage>,
        mut policy: PassThrough,
    ) -> (Option<UpMessage>, Vec<UpMessage>) {
        let pair = connected_pair().await;
        let downstream = open_session(&pair.client, JOB, &DownMessage::Attach(JOB))
            .await
            .unwrap();
        let (mut send, _recv, _first): (FramedSend, _, _) =
            accept_stream(&pair.server).await.unwrap().unwrap();
        for message in &messages {
            send.send(message).await.unwrap();
        }
        let (_keep_open, down) = mpsc::channel(1);
        let mut upstream = Recorder {
            sent: Vec::new(),
            down,
        };
        let hop = Hop {
            role: Role::Miner,
            hotkey: seeded_key(3).hotkey(),
        };
        let cancel = CancellationToken::new();
        let relay = Relay::new(hop, "executor".to_owned(), "validator", downstream, &cancel);
        let last = tokio::time::timeout(
            Duration::from_secs(10),
            relay.run(&mut upstream, &mut policy),
        )
        .await
        .unwrap();
        (last, upstream.sent)
    }

    /// A job's last message ends the relay, `Rejected` and `Declined` included; what came
    /// before it went up in order.
    #[tokio::test]
    async fn the_jobs_last_message_ends_the_relay() {
        for last in [
            UpMessage::Rejected(RejectReason::Expired),
            UpMessage::Declined(DeclineReason::Busy),
        ] {
            let messages = vec![
                ControlMessage::Up(UpMessage::Accepted),
                ControlMessage::Up(last.clone()),
                ControlMessage::Up(UpMessage::ExecutorReady),
            ];
            let (end, sent) = relay_against(messages, PassThrough { deadline: None }).await;
            assert_eq!(end, Some(last));
            assert_eq!(sent, vec![UpMessage::Accepted]);
        }
    }

    /// A message on the wrong side from the next hop is a protocol violation, reported up as
    /// `HordeFailed` by this hop.
    #[tokio::test]
    async fn a_down_message_from_the_next_hop_fails_the_job() {
        let messages = vec![ControlMessage::Down(DownMessage::Attach(JOB))];
        let (end, _) = relay_against(messages, PassThrough { deadline: None }).await;
        match end {
            Some(UpMessage::HordeFailed(failure)) => {
                assert_eq!(failure.reported_by, Role::Miner);
                assert!(
                    failure.reason.contains("violated the protocol"),
                    "{failure:?}"
                );
            }
            other => panic!("expected HordeFailed, got {other:?}"),
        }
    }

    /// The policy's deadline ends the relay with the policy's step.
    #[tokio::test]
    async fn the_deadline_ends_the_relay() {
        let deadline = Some(Instant::now() + Duration::from_millis(50));
        let (end, sent) = relay_against(Vec::new(), PassThrough { deadline }).await;
        assert_eq!(end, Some(UpMessage::Rejected(RejectReason::Expired)));
        assert!(sent.is_empty());
    }
}
