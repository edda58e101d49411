//! Job sessions: one bidirectional stream per job per hop on a `horde/control/1` connection.
//!
//! The upstream side opens the stream with [`open_session`], which writes the first
//! [`DownMessage`] at once (quinn only shows a stream to the peer once data is written). The
//! downstream side loops on [`accept_stream`], which returns the first frame so the role can
//! dispatch (a job session, an executor registration, a report). Each stream has its own flow
//! control, so a job whose peer stops reading never blocks another job on the same connection.

use std::time::Duration;

use horde_protocol::{ControlMessage, DownMessage, Hotkey, JobId, UpMessage};
use quinn::{ConnectionError, VarInt};
use serde::Serialize;
use tracing::warn;

use crate::codes;
use crate::framed::{ChannelError, FramedRecv, FramedSend, split};
use crate::tls::{PeerCertificateError, remote_hotkey};

/// How long the opener of a stream has to deliver its first frame. The opener writes it in the
/// same breath as opening the stream, so anything slower is a stuck or hostile peer holding one of
/// our stream slots.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Opening or accepting a session failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Connection(#[from] ConnectionError),
    /// The stream failed or carried a bad frame.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The peer's identity could not be read from the connection.
    #[error("peer identity: {0}")]
    Identity(#[from] PeerCertificateError),
    /// The peer opened a stream and finished it without sending anything.
    #[error("stream ended before its first message")]
    EmptyStream,
    /// The peer opened a stream and did not send its first message in time.
    #[error("no first message within {0:.1?}")]
    FirstFrameTimeout(Duration),
}

/// [`ControlMessage`] borrowing its content: encodes to the same bytes without cloning the
/// message (postcard writes the variant index, then the content). Variant order must match.
#[derive(Serialize)]
enum ControlMessageRef<'a> {
    Down(&'a DownMessage),
    Up(&'a UpMessage),
}

/// One job's stream on one hop.
#[derive(Debug)]
pub struct JobSession {
    job_id: JobId,
    send: FramedSend,
    recv: FramedRecv,
    peer: Hotkey,
}

impl JobSession {
    /// Wraps an accepted stream (see [`accept_stream`]) once the role knows which job it carries.
    pub fn new(job_id: JobId, peer: Hotkey, send: FramedSend, recv: FramedRecv) -> Self {
        Self {
            job_id,
            send,
            recv,
            peer,
        }
    }

    /// The job.
    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    /// The hop on the other end.
    pub fn peer(&self) -> &Hotkey {
        &self.peer
    }

    /// Sends a message toward the executor.
    pub async fn send_down(&mut self, message: &DownMessage) -> Result<(), ChannelError> {
        self.send.send(&ControlMessageRef::Down(message)).await
    }

    /// Sends a message toward the client.
    pub async fn send_up(&mut self, message: &UpMessage) -> Result<(), ChannelError> {
        self.send.send(&ControlMessageRef::Up(message)).await
    }

    /// The next message; `None` when the peer finished its side. Cancel-safe.
    ///
    /// A bad frame stops the stream (see [`FramedRecv::recv`]) and is logged with the peer and job.
    pub async fn recv(&mut self) -> Result<Option<ControlMessage>, ChannelError> {
        let result = self.recv.recv().await;
        if let Err(ChannelError::Frame(error)) = &result {
            warn!(
                peer = %self.peer.fmt_short(),
                job = %self.job_id.fmt_short(),
                %error,
                "bad frame on job session; stream stopped"
            );
        }
        result
    }

    /// Ends our side cleanly: the peer's `recv` returns `None` after what we sent.
    pub fn finish(&mut self) -> Result<(), ChannelError> {
        self.send.finish()
    }

    /// After [`JobSession::finish`]: waits until the peer has acknowledged everything sent (see
    /// [`FramedSend::delivered`]); an error means the peer may lack part of it.
    pub async fn delivered(&mut self) -> Result<(), ChannelError> {
        self.send.delivered().await
    }

    /// Abandons the session in both directions with `code` (e.g. [`codes::CANCELLED`]).
    pub fn abort(&mut self, code: VarInt) {
        self.send.reset(code);
        self.recv.stop(code);
    }

    /// The two halves, to relay each direction from its own task.
    pub fn into_parts(self) -> (FramedSend, FramedRecv) {
        (self.send, self.recv)
    }
}

/// Opens a job session toward the next hop and sends `first` on it immediately.
pub async fn open_session(
    connection: &quinn::Connection,
    job_id: JobId,
    first: &DownMessage,
) -> Result<JobSession, SessionError> {
    let peer = remote_hotkey(connection)?;
    let (send, recv) = connection.open_bi().await?;
    let (send, recv) = split(send, recv);
    let mut session = JobSession::new(job_id, peer, send, recv);
    session.send_down(first).await?;
    Ok(session)
}

/// Accepts the next stream the peer opens and reads its first message.
///
/// `Ok(None)` when the connection was closed by the application on either side. A stream that
/// ends or stalls before its first message is stopped with [`codes::PROTOCOL_VIOLATION`] and
/// reported as an error; the caller should keep accepting (one bad stream does not doom the
/// connection) and hand each session to its own task.
///
/// The next stream is not accepted until this one's first message is in (up to
/// [`FIRST_FRAME_TIMEOUT`]): fine for a peer that serves one stream at a time. A peer serving
/// many at once accepts with [`accept_framed_stream`] and reads each first message with
/// [`read_first_message`] concurrently, so a stream whose first frame is slow (lost packets, a
/// stuck peer) never holds up the streams opened after it.
pub async fn accept_stream(
    connection: &quinn::Connection,
) -> Result<Option<(FramedSend, FramedRecv, ControlMessage)>, SessionError> {
    match accept_framed_stream(connection).await? {
        Some((send, recv)) => read_first_message(send, recv).await.map(Some),
        None => Ok(None),
    }
}

/// Accepts the next stream the peer opens, without reading from it (see [`accept_stream`]).
/// `Ok(None)` when the connection was closed by the application on either side.
pub async fn accept_framed_stream(
    connection: &quinn::Connection,
) -> Result<Option<(FramedSend, FramedRecv)>, SessionError> {
    match connection.accept_bi().await {
        Ok((send, recv)) => Ok(Some(split(send, recv))),
        Err(ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Reads the first message of an accepted stream within [`FIRST_FRAME_TIMEOUT`]. A stream that
/// ends, sends a bad frame or stalls first is stopped with [`codes::PROTOCOL_VIOLATION`] and
/// reported as an error.
pub async fn read_first_message(
    mut send: FramedSend,
    mut recv: FramedRecv,
) -> Result<(FramedSend, FramedRecv, ControlMessage), SessionError> {
    let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, recv.recv()).await {
        Ok(Ok(Some(first))) => first,
        Ok(Ok(None)) => {
            send.reset(codes::PROTOCOL_VIOLATION);
            return Err(SessionError::EmptyStream);
        }
        Ok(Err(error)) => {
            send.reset(codes::PROTOCOL_VIOLATION);
            return Err(error.into());
        }
        Err(_) => {
            send.reset(codes::PROTOCOL_VIOLATION);
            recv.stop(codes::PROTOCOL_VIOLATION);
            return Err(SessionError::FirstFrameTimeout(FIRST_FRAME_TIMEOUT));
        }
    };
    Ok((send, recv, first))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use horde_protocol::codec::to_bytes;
    use horde_protocol::{Signature, Signed, VolumeList};
    use tokio::task::JoinSet;

    use super::*;
    use crate::test_utils::connected_pair;

    #[test]
    fn borrowed_encoding_matches_owned() {
        let down = DownMessage::Attach(JobId([9; 16]));
        assert_eq!(
            to_bytes(&ControlMessageRef::Down(&down)),
            to_bytes(&ControlMessage::Down(down.clone()))
        );
        let up = UpMessage::VolumesFetched { volume_msg_id: 300 };
        assert_eq!(
            to_bytes(&ControlMessageRef::Up(&up)),
            to_bytes(&ControlMessage::Up(up.clone()))
        );
    }

    fn job(n: u8) -> JobId {
        JobId([n; 16])
    }

    /// A ~512 KiB message: enough of them fill a stream's 8 MiB window.
    fn bulky(peer: Hotkey) -> DownMessage {
        DownMessage::Volumes(Signed::<VolumeList>::from_parts(
            vec![0; 512 * 1024],
            peer,
            Signature::from_bytes([0; 64]),
        ))
    }

    #[tokio::test]
    async fn session_round_trip_and_clean_end() {
        let pair = connected_pair().await;
        let first = DownMessage::Attach(job(1));
        let mut session = open_session(&pair.client, job(1), &first).await.unwrap();
        assert_eq!(session.peer(), &pair.server_endpoint.hotkey());
        let (mut send, mut recv, got) = accept_stream(&pair.server).await.unwrap().unwrap();
        assert_eq!(got, ControlMessage::Down(first));
        send.send(&ControlMessage::Up(UpMessage::Accepted))
            .await
            .unwrap();
        send.finish().unwrap();
        assert_eq!(
            session.recv().await.unwrap(),
            Some(ControlMessage::Up(UpMessage::Accepted))
        );
        assert_eq!(session.recv().await.unwrap(), None);
        session.finish().unwrap();
        assert_eq!(recv.recv::<ControlMessage>().await.unwrap(), None);
    }

    #[tokio::test]
    async fn fifty_sessions_run_concurrently_next_to_a_stalled_one() {
        let pair = connected_pair().await;
        let server = pair.server.clone();
        let client_key = pair.client_endpoint.hotkey();
        let stalled_job = job(255);
        // The server answers every message of every session, except the stalled job's, whose
        // stream it keeps open and never reads again.
        let server_task = tokio::spawn(async move {
            let mut parked = Vec::new();
            let mut sessions = JoinSet::new();
            while let Ok(Some((send, recv, first))) = accept_stream(&server).await {
                let ControlMessage::Down(DownMessage::Attach(job_id)) = first else {
                    panic!("unexpected first message {first:?}");
                };
                if job_id == stalled_job {
                    parked.push((send, recv));
                    continue;
                }
                sessions.spawn(async move {
                    let mut session = JobSession::new(job_id, client_key, send, recv);
                    let mut count = 0u64;
                    session
                        .send_up(&UpMessage::VolumesFetched {
                            volume_msg_id: count,
                        })
                        .await
                        .unwrap();
                    while let Some(message) = session.recv().await.unwrap() {
                        assert!(matches!(message, ControlMessage::Down(_)));
                        count += 1;
                        session
                            .send_up(&UpMessage::VolumesFetched {
                                volume_msg_id: count,
                            })
                            .await
                            .unwrap();
                    }
                    session.finish().unwrap();
                });
            }
            drop(parked);
        });

        let client = Arc::new(pair.client.clone());
        let server_key = pair.server_endpoint.hotkey();
        let mut stalled = open_session(&client, stalled_job, &DownMessage::Attach(stalled_job))
            .await
            .unwrap();
        let stalled_writer = tokio::spawn(async move {
            // 40 × 512 KiB = 20 MiB: far beyond the 8 MiB stream window, so this blocks.
            for _ in 0..40 {
                stalled.send_down(&bulky(server_key)).await.unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut clients = JoinSet::new();
        for n in 0..50u8 {
            let client = Arc::clone(&client);
            clients.spawn(async move {
                let mut session = open_session(&client, job(n), &DownMessage::Attach(job(n)))
                    .await
                    .unwrap();
                for round in 0..3u64 {
                    let reply = session.recv().await.unwrap();
                    assert_eq!(
                        reply,
                        Some(ControlMessage::Up(UpMessage::VolumesFetched {
                            volume_msg_id: round
                        }))
                    );
                    session
                        .send_down(&DownMessage::Attach(job(n)))
                        .await
                        .unwrap();
                }
                session.finish().unwrap();
                assert!(matches!(
                    session.recv().await.unwrap(),
                    Some(ControlMessage::Up(UpMessage::VolumesFetched {
                        volume_msg_id: 3
                    }))
                ));
                assert_eq!(session.recv().await.unwrap(), None);
            });
        }
        let all = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(result) = clients.join_next().await {
                result.unwrap();
            }
        })
        .await;
        assert!(all.is_ok(), "sessions were blocked by the stalled one");
        assert!(
            !stalled_writer.is_finished(),
            "the stalled session should still be blocked on flow control"
        );
        stalled_writer.abort();
        pair.client.close(codes::SHUTDOWN, b"done");
        server_task.await.unwrap();
    }

    #[tokio::test]
    async fn empty_stream_is_a_typed_error() {
        let pair = connected_pair().await;
        let (mut send, _recv) = pair.client.open_bi().await.unwrap();
        // quinn shows the stream once something is sent; a FIN alone is enough.
        send.finish().unwrap();
        assert!(matches!(
            accept_stream(&pair.server).await,
            Err(SessionError::EmptyStream)
        ));
    }

    #[tokio::test]
    async fn closed_connection_ends_accepting() {
        let pair = connected_pair().await;
        pair.client.close(codes::SHUTDOWN, b"bye");
        assert!(matches!(accept_stream(&pair.server).await, Ok(None)));
    }

    #[tokio::test]
    async fn bad_first_frame_stops_the_stream() {
        let pair = connected_pair().await;
        let (mut send, _recv) = pair.client.open_bi().await.unwrap();
        send.write_all(&(2 * horde_protocol::MAX_FRAME_LEN).to_be_bytes())
            .await
            .unwrap();
        assert!(matches!(
            accept_stream(&pair.server).await,
            Err(SessionError::Channel(ChannelError::Frame(
                horde_protocol::FrameError::TooLarge { .. }
            )))
        ));
        assert_eq!(send.stopped().await.unwrap(), Some(codes::FRAME_TOO_LARGE));
    }
}
