//! Closing without waiting out QUIC's draining period.
//!
//! After a close, quinn keeps a connection in its draining state for three probe timeouts
//! (RFC 9000 §10.2; with the 25 ms maximum ACK delay that is ≥ 75 ms even on loopback), and
//! [`quinn::Endpoint::wait_idle`] waits for that. A one-shot command (`horde job request`,
//! `horde blob get`) need not: the peer only has to receive the CONNECTION_CLOSE, which leaves
//! on the connection driver's next run. [`close_promptly`] closes and waits exactly until that
//! frame has been handed to the socket; [`close_endpoint_promptly`] does the same for an
//! endpoint whose connections the caller no longer holds.

use std::time::Duration;

use quinn::VarInt;

use crate::endpoint::HordeEndpoint;

/// The longest [`close_promptly`] waits for the close to leave: only a stalled runtime or a
/// socket that stays unwritable gets near it (a healthy driver sends within microseconds).
pub const CLOSE_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// How often [`close_promptly`] looks whether the close has been sent (tokio's timer
/// granularity).
const CLOSE_POLL: Duration = Duration::from_millis(1);

/// What [`close_endpoint_promptly`] gives the drivers of connections it cannot see to send
/// their closes: they are woken by the close at once and send in microseconds, so 10 ms covers
/// a busy machine while staying well below the ≥ 75 ms of a drain.
pub const ENDPOINT_CLOSE_GRACE: Duration = Duration::from_millis(10);

/// Closes `connection` with `code` and `reason` and returns once the CONNECTION_CLOSE has been
/// sent, without waiting for the draining period. A closed connection sends nothing but its
/// close, so the first datagram counted after the close is it (quinn counts a datagram under
/// the lock its driver holds while handing it to the socket). Returns `true` once the close was
/// sent or there is nothing to send (the peer closed first, the connection timed out, or the
/// caller had closed it already), `false` if [`CLOSE_SEND_TIMEOUT`] passed first.
pub async fn close_promptly(connection: &quinn::Connection, code: VarInt, reason: &[u8]) -> bool {
    if connection.close_reason().is_some() {
        // Closed by the peer, reset or timed out: nobody to tell; closed by us: told then.
        return true;
    }
    let sent_before = connection.stats().udp_tx.datagrams;
    connection.close(code, reason);
    let sent = async {
        loop {
            if connection.stats().udp_tx.datagrams > sent_before {
                return;
            }
            tokio::time::sleep(CLOSE_POLL).await;
        }
    };
    tokio::time::timeout(CLOSE_SEND_TIMEOUT, sent).await.is_ok()
}

/// Closes every connection of `endpoint` (and stops accepting), then gives their drivers
/// [`ENDPOINT_CLOSE_GRACE`] to send the closes rather than waiting for the draining period.
/// For connections the caller still holds, [`close_promptly`] is exact; this is for those it
/// has dropped (dropping the last handle closes a connection and sends its close likewise).
pub async fn close_endpoint_promptly(endpoint: &HordeEndpoint, code: VarInt, reason: &[u8]) {
    endpoint.close(code, reason);
    let _ = tokio::time::timeout(ENDPOINT_CLOSE_GRACE, endpoint.wait_idle()).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::codes;
    use crate::test_utils::connected_pair;
    use quinn::ConnectionError;

    /// The peer learns of the close from the CONNECTION_CLOSE itself: the closing side's
    /// endpoint is gone right after `close_promptly` returns, so nothing else could tell it
    /// (without the close it would wait for its 10 s idle timeout, past this test's 5 s bound).
    #[tokio::test]
    async fn the_peer_receives_the_close_after_a_prompt_close() {
        let pair = connected_pair().await;
        assert!(close_promptly(&pair.client, codes::SHUTDOWN, b"done").await);
        drop(pair.client);
        drop(pair.client_endpoint);
        let reason = tokio::time::timeout(Duration::from_secs(5), pair.server.closed())
            .await
            .expect("the close reached the peer");
        match reason {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, codes::SHUTDOWN);
                assert_eq!(&close.reason[..], b"done");
            }
            other => panic!("expected the application close, got {other:?}"),
        }
    }

    /// A connection the peer closed first has nothing to send: the call returns at once with
    /// `true` and does not replace the peer's reason.
    #[tokio::test]
    async fn a_connection_the_peer_closed_needs_no_close() {
        let pair = connected_pair().await;
        pair.server.close(codes::BUSY, b"full");
        let _ = pair.client.closed().await;
        assert!(close_promptly(&pair.client, codes::SHUTDOWN, b"done").await);
        assert!(matches!(
            pair.client.close_reason(),
            Some(ConnectionError::ApplicationClosed(close)) if close.error_code == codes::BUSY
        ));
    }

    /// An endpoint closed promptly still tells the peer of the connection it held.
    #[tokio::test]
    async fn the_peer_receives_the_close_of_a_promptly_closed_endpoint() {
        let pair = connected_pair().await;
        close_endpoint_promptly(&pair.client_endpoint, codes::SHUTDOWN, b"bye").await;
        drop(pair.client_endpoint);
        let reason = tokio::time::timeout(Duration::from_secs(5), pair.server.closed())
            .await
            .expect("the close reached the peer");
        assert!(matches!(
            reason,
            ConnectionError::ApplicationClosed(close) if close.error_code == codes::SHUTDOWN
        ));
    }
}
