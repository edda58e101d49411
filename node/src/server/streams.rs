//! Job streams between roles: the loop that serves the streams of an incoming connection (each
//! first message read concurrently, each stream on a task of its own), and one-shot requests on
//! a stream of their own. Outgoing connections are shared through transport's
//! `ConnectionCache` (one per peer and ALPN, one dial at a time, redialed once closed).

use horde_protocol::ControlMessage;
use horde_transport::{
    ChannelError, FramedRecv, FramedSend, accept_framed_stream, read_first_message, split,
};
use tokio::task::JoinSet;
use tracing::Instrument as _;

/// A [`request`] that got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// No stream could be opened on the connection.
    #[error(transparent)]
    Open(#[from] quinn::ConnectionError),
    /// Sending the request or reading the answer failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The peer finished the stream without answering.
    #[error("the peer ended the stream without an answer")]
    NoAnswer,
}

/// A one-shot exchange on a stream of its own: opens a stream on `connection`, sends `message`,
/// finishes, and returns the peer's single answer. The caller bounds it with a timeout.
pub(crate) async fn request(
    connection: &quinn::Connection,
    message: &ControlMessage,
) -> Result<ControlMessage, RequestError> {
    let (send, recv) = connection.open_bi().await?;
    let (mut send, mut recv) = split(send, recv);
    send.send(message).await?;
    let _ = send.finish();
    recv.recv::<ControlMessage>()
        .await?
        .ok_or(RequestError::NoAnswer)
}

/// Accepts the streams of an incoming connection until it closes or `cancel` fires, and runs
/// `handle(send, recv, first message)` for each on its own task (in the current span), so one
/// slow job never holds up another. Then waits for those tasks: each ends with its stream, or
/// by the role's own cancellation (which `cancel` is, or a child of); dropping this future
/// aborts them.
///
/// First messages are read concurrently (each within [`horde_transport::FIRST_FRAME_TIMEOUT`]):
/// a stream whose first frame is late — a lost packet, a stuck or hostile peer — does not hold
/// up the streams opened after it. At most the connection's stream limit are pending at once.
pub(crate) async fn serve_streams<F, Fut>(
    connection: &quinn::Connection,
    cancel: &tokio_util::sync::CancellationToken,
    handle: F,
) where
    F: Fn(FramedSend, FramedRecv, ControlMessage) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // Dropped (aborting what is still pending) when serving ends.
    let mut first_messages = JoinSet::new();
    let mut handlers = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
            Some(read) = first_messages.join_next() => match read {
                Ok(Ok((send, recv, first))) => {
                    handlers.spawn(handle(send, recv, first).in_current_span());
                }
                Ok(Err(error)) => tracing::debug!(%error, "incoming stream failed"),
                Err(error) => tracing::debug!(%error, "reading a first message failed"),
            },
            accepted = accept_framed_stream(connection) => match accepted {
                Ok(Some((send, recv))) => {
                    first_messages.spawn(read_first_message(send, recv));
                }
                Ok(None) => break,
                // A dead connection fails every accept: stop, rather than spin on it.
                Err(_) if connection.close_reason().is_some() => break,
                Err(error) => tracing::debug!(%error, "incoming stream failed"),
            },
        }
    }
    while handlers.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use horde_protocol::{DownMessage, JobId};
    use horde_transport::open_session;
    use horde_transport::test_utils::connected_pair;
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A stream whose first frame stalls half-way does not hold up a stream opened after it:
    /// the second is handled at once, not after the first one's 10 s first-frame timeout.
    #[tokio::test]
    async fn a_stalled_first_frame_does_not_hold_up_later_streams() {
        let pair = connected_pair().await;
        let (handled, mut handled_rx) = tokio::sync::mpsc::channel(4);
        let cancel = CancellationToken::new();
        let server = pair.server.clone();
        let serving = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                serve_streams(&server, &cancel, |_send, _recv, first| {
                    let handled = handled.clone();
                    async move {
                        let _ = handled.send(first).await;
                    }
                })
                .await;
            }
        });
        // Half of a frame's length prefix, then nothing. Its stream id is the lower one, so the
        // server accepts it first.
        let (mut stalled, _stalled_recv) = pair.client.open_bi().await.unwrap();
        stalled.write_all(&[0, 0]).await.unwrap();
        let _session = open_session(
            &pair.client,
            JobId([1; 16]),
            &DownMessage::Attach(JobId([1; 16])),
        )
        .await
        .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), handled_rx.recv())
            .await
            .expect("the second stream is handled while the first one stalls")
            .unwrap();
        assert_eq!(
            first,
            ControlMessage::Down(DownMessage::Attach(JobId([1; 16])))
        );
        assert!(
            handled_rx.try_recv().is_err(),
            "the stalled stream is not handled"
        );
        cancel.cancel();
        serving.await.unwrap();
    }
}
