//! The validator's side of the hand-over: an `Assign` is answered `AssignmentReceived` at once,
//! before any check or dial, and acted on only when the facilitator's `Proceed` follows.
//!
//! The facilitator sends `Proceed` after it recorded the job `Assigned`; when the answer does
//! not reach it in time (this validator slow, or the link gone) it resets the stream and gives
//! the job to another validator. So an assignment without `Proceed` — the stream reset or
//! closed, or nothing within [`PROCEED_WAIT`] — is dropped here without contacting the miner:
//! the job never runs twice, whoever times out first.

use std::time::Duration;

use horde_protocol::{ControlMessage, DownMessage, UpMessage};
use horde_transport::{ChannelError, FramedRecv, FramedSend};

/// How long an acknowledged assignment waits for `Proceed`. The facilitator sends it one
/// store write after the answer arrives; 10 s leaves room for a slow disk and is the QUIC
/// handshake timeout, the other wait a facilitator's hand-over may have.
pub(super) const PROCEED_WAIT: Duration = Duration::from_secs(10);

/// Why an assignment was dropped before it was acted on.
#[derive(Debug, thiserror::Error)]
pub(super) enum HandOverError {
    #[error("the answer could not be sent: {0}")]
    Answer(ChannelError),
    #[error("the facilitator withdrew it: {0}")]
    Withdrawn(ChannelError),
    #[error("the facilitator ended the stream without Proceed")]
    Ended,
    #[error("no Proceed within {0:?}")]
    NoProceed(Duration),
    #[error("the facilitator sent {0} instead of Proceed")]
    Unexpected(String),
}

/// Answers an `Assign` just read from `recv` and waits up to `wait` for `Proceed`.
pub(super) async fn hand_over(
    send: &mut FramedSend,
    recv: &mut FramedRecv,
    wait: Duration,
) -> Result<(), HandOverError> {
    send.send(&ControlMessage::Up(UpMessage::AssignmentReceived))
        .await
        .map_err(HandOverError::Answer)?;
    match tokio::time::timeout(wait, recv.recv::<ControlMessage>()).await {
        Ok(Ok(Some(ControlMessage::Down(DownMessage::Proceed)))) => Ok(()),
        Ok(Ok(Some(other))) => Err(HandOverError::Unexpected(other.name().to_owned())),
        Ok(Ok(None)) => Err(HandOverError::Ended),
        Ok(Err(error)) => Err(HandOverError::Withdrawn(error)),
        Err(_) => Err(HandOverError::NoProceed(wait)),
    }
}
