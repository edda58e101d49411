//! The client side of the tunnel: [`JobTunnel`] opens [`TunnelStream`]s to the job and checks
//! the job's receipt on each (HTTP over one stream is in `request.rs`).

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use horde_protocol::codec::encode_frame;
use horde_protocol::records::ClientStreamSignature;
use horde_protocol::{Hotkey, HotkeyVerifier, JobId, JobReceipt, SecretKey, Signed, TunnelFrame};
use quinn::VarInt;

use super::wire::{DirectionDigest, FrameIn, Incoming, push_data_frames, write_data};
use super::{DATA_CHUNK, MAX_TUNNEL_FRAME_LEN, TunnelError};
use crate::tls::remote_hotkey;

/// What the client sent, shared by the two halves of a stream so the reader can check the
/// receipt's `digest_in`.
type SentTally = Arc<Mutex<DirectionDigest>>;

fn lock(tally: &SentTally) -> std::sync::MutexGuard<'_, DirectionDigest> {
    tally.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The client's side of one tunnel stream. See the module docs for the protocol.
#[derive(Debug)]
pub struct TunnelStream {
    writer: TunnelWriter,
    pub(super) reader: TunnelReader,
}

/// The sending half of a [`TunnelStream`].
pub struct TunnelWriter {
    send: quinn::SendStream,
    job_id: JobId,
    stream: u64,
    client_key: SecretKey,
    sent: SentTally,
    finished: bool,
}

/// The receiving half of a [`TunnelStream`].
pub struct TunnelReader {
    frames: FrameIn,
    job_id: JobId,
    stream: u64,
    job_key: HotkeyVerifier,
    sent: SentTally,
    received: DirectionDigest,
    output_ended: bool,
    receipt: Option<Signed<JobReceipt>>,
}

impl std::fmt::Debug for TunnelWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelWriter")
            .field("job_id", &self.job_id)
            .field("stream", &self.stream)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TunnelReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelReader")
            .field("job_id", &self.job_id)
            .field("stream", &self.stream)
            .field("received", &self.received.bytes)
            .field("output_ended", &self.output_ended)
            .field("receipt", &self.receipt)
            .finish_non_exhaustive()
    }
}

/// What [`TunnelReader::next_event`] read.
pub(super) enum ReaderEvent {
    Data(Bytes),
    /// The job closed its side; only the receipt is still to come.
    OutputEnded,
    /// The verified receipt arrived and the stream ended.
    Done,
}

/// A `horde/job/1` connection to a job endpoint, with the job, the per-job client key and the
/// pinned job key. [`JobTunnel::new`] checks once that the connection's peer (its TLS
/// certificate, verified at the handshake) is the pinned job key and prepares that key for
/// verifying receipts, so a stream opened afterwards costs no certificate parsing and no point
/// decompression. Cheap to clone.
///
/// **Runtime.** Streams move fastest when the connection and its readers share one thread (a
/// current-thread runtime, as `horde job forward` and `horde blob` use): on a multi-thread
/// runtime each packet's hand-offs (UDP socket → quinn's endpoint → its connection → the reading
/// task) may cross workers. Measured with `flow-latency`, bulk 256 MiB, two runs: across a veth
/// pair at MTU 1,500 3.7 / 4.3 Gbit/s from the bench's 2-worker runtime, 4.3 / 5.9 from a
/// current-thread one; loopback 6.4 / 7.0 against 7.0 / 8.0 (benches/RESULTS.md, "One thread
/// for the blob CLI").
#[derive(Clone)]
pub struct JobTunnel {
    connection: quinn::Connection,
    job_id: JobId,
    client_key: SecretKey,
    job_key: HotkeyVerifier,
}

impl std::fmt::Debug for JobTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTunnel")
            .field("job_id", &self.job_id)
            .field("job_key", self.job_key.hotkey())
            .field("remote", &self.connection.remote_address())
            .finish_non_exhaustive()
    }
}

impl JobTunnel {
    /// Wraps a `horde/job/1` connection to the job endpoint, whose TLS identity must be `job_key`
    /// (the key pinned from the verified endpoint record); [`TunnelError::WrongJobKey`] otherwise.
    pub fn new(
        connection: quinn::Connection,
        job_id: JobId,
        client_key: SecretKey,
        job_key: Hotkey,
    ) -> Result<Self, TunnelError> {
        let wrong = |actual: String| TunnelError::WrongJobKey {
            expected: job_key,
            actual,
        };
        match remote_hotkey(&connection) {
            Ok(actual) if actual == job_key => {}
            Ok(actual) => return Err(wrong(actual.to_string())),
            Err(error) => return Err(wrong(error.to_string())),
        }
        let job_key = job_key
            .verifier()
            .map_err(|error| wrong(error.to_string()))?;
        Ok(Self {
            connection,
            job_id,
            client_key,
            job_key,
        })
    }

    /// The QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// The job.
    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    /// The pinned job key.
    pub fn job_key(&self) -> Hotkey {
        *self.job_key.hotkey()
    }

    /// Opens a tunnel stream to the job.
    pub async fn open(&self) -> Result<TunnelStream, TunnelError> {
        let (send, recv) = self.connection.open_bi().await?;
        let stream = u64::from(send.id());
        let sent = Arc::new(Mutex::new(DirectionDigest::new()));
        Ok(TunnelStream {
            writer: TunnelWriter {
                send,
                job_id: self.job_id,
                stream,
                client_key: self.client_key.clone(),
                sent: Arc::clone(&sent),
                finished: false,
            },
            reader: TunnelReader {
                frames: FrameIn::new(recv),
                job_id: self.job_id,
                stream,
                job_key: self.job_key,
                sent,
                received: DirectionDigest::new(),
                output_ended: false,
                receipt: None,
            },
        })
    }
}

impl TunnelStream {
    /// The QUIC stream id, as signed in `ClientEnd` and the receipt.
    pub fn id(&self) -> u64 {
        self.writer.stream
    }

    /// Sends bytes to the job.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), TunnelError> {
        self.writer.write(data).await
    }

    /// Sends bytes to the job without copying them.
    pub async fn write_bytes(&mut self, data: Bytes) -> Result<(), TunnelError> {
        self.writer.write_bytes(data).await
    }

    /// Signs what was sent, sends `ClientEnd` and finishes the sending side.
    pub async fn finish_sending(&mut self) -> Result<(), TunnelError> {
        self.writer.finish_sending().await
    }

    /// Sends the last bytes and `ClientEnd` in one write; see [`TunnelWriter::write_last`].
    pub async fn write_last(&mut self, data: Bytes) -> Result<(), TunnelError> {
        self.writer.write_last(data).await
    }

    /// The next bytes from the job; `None` once the verified receipt has arrived and the stream
    /// ended. See [`TunnelReader::read`].
    pub async fn read(&mut self) -> Result<Option<Bytes>, TunnelError> {
        self.reader.read().await
    }

    /// The verified receipt, once [`read`](Self::read) returned `None`.
    pub fn receipt(&self) -> Option<&Signed<JobReceipt>> {
        self.reader.receipt()
    }

    /// Splits into halves usable from two tasks (full duplex).
    pub fn into_split(self) -> (TunnelWriter, TunnelReader) {
        (self.writer, self.reader)
    }
}

impl TunnelWriter {
    /// Sends bytes to the job.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), TunnelError> {
        for piece in data.chunks(DATA_CHUNK) {
            self.write_bytes(Bytes::copy_from_slice(piece)).await?;
        }
        Ok(())
    }

    /// Sends bytes to the job without copying them.
    pub async fn write_bytes(&mut self, data: Bytes) -> Result<(), TunnelError> {
        if self.finished {
            return Err(TunnelError::Finished);
        }
        lock(&self.sent).add(&data);
        write_data(&mut self.send, data).await
    }

    /// Signs what was sent (job id, stream id, BLAKE3 of the bytes), sends `ClientEnd` and
    /// finishes the sending side.
    pub async fn finish_sending(&mut self) -> Result<(), TunnelError> {
        if self.finished {
            return Err(TunnelError::Finished);
        }
        self.finished = true;
        // Let the connection send the data already written before this task spends its time on
        // the signature: the job can start on the request meanwhile.
        tokio::task::yield_now().await;
        let client_end = self.client_end()?;
        self.send
            .write_all(&client_end)
            .await
            .map_err(TunnelError::from_write)?;
        self.send.finish().map_err(|_| TunnelError::Finished)
    }

    /// Sends `data` as the last bytes to the job, signed at once: the bytes and `ClientEnd` go
    /// out in one write (one packet for a short request), then the sending side finishes. For a
    /// request known whole in advance (an HTTP request): the job's endpoint then knows the
    /// client is done as the request arrives, and can send the reply's last bytes together with
    /// its receipt.
    pub async fn write_last(&mut self, data: Bytes) -> Result<(), TunnelError> {
        if self.finished {
            return Err(TunnelError::Finished);
        }
        self.finished = true;
        lock(&self.sent).add(&data);
        let mut chunks = Vec::with_capacity(3);
        push_data_frames(data, &mut chunks);
        chunks.push(Bytes::from(self.client_end()?));
        self.send
            .write_all_chunks(&mut chunks)
            .await
            .map_err(TunnelError::from_write)?;
        self.send.finish().map_err(|_| TunnelError::Finished)
    }

    /// The encoded `ClientEnd` frame over everything sent so far.
    fn client_end(&self) -> Result<Vec<u8>, TunnelError> {
        let digest_in = lock(&self.sent).digest();
        let signature = Signed::sign(
            &self.client_key,
            &ClientStreamSignature {
                job_id: self.job_id,
                stream: self.stream,
                digest_in,
            },
        );
        Ok(encode_frame(
            &TunnelFrame::ClientEnd(signature),
            MAX_TUNNEL_FRAME_LEN,
        )?)
    }

    /// Abandons the sending side with an application error code.
    pub fn reset(&mut self, code: VarInt) {
        self.finished = true;
        // Already finished or reset by the peer: nothing left to abandon.
        let _ = self.send.reset(code);
    }

    /// The QUIC stream id.
    pub fn id(&self) -> u64 {
        self.stream
    }
}

impl TunnelReader {
    /// The next bytes from the job (pieces of `Data` payloads, in order, never empty); `None`
    /// once the job's receipt has arrived, been verified, and the stream ended.
    ///
    /// Errors: [`TunnelError::BadReceipt`] for a receipt that does not match, and
    /// [`TunnelError::MissingReceipt`] for a stream that ends without one. Not cancel-safe: use
    /// [`TunnelStream::into_split`] to read and write from different tasks.
    pub async fn read(&mut self) -> Result<Option<Bytes>, TunnelError> {
        loop {
            match self.next_event().await? {
                ReaderEvent::Data(bytes) => return Ok(Some(bytes)),
                ReaderEvent::OutputEnded => {}
                ReaderEvent::Done => return Ok(None),
            }
        }
    }

    /// Tells the job's endpoint to stop sending (QUIC STOP_SENDING with `code`): it closes the
    /// job's connection for this stream, and no receipt follows. For a reader whose consumer
    /// went away while the job still sends.
    pub fn stop(&mut self, code: VarInt) {
        self.frames.stop(code);
    }

    /// Whether the job has closed its side (the output-ended marker arrived).
    pub fn output_ended(&self) -> bool {
        self.output_ended
    }

    /// The verified receipt, once [`read`](Self::read) returned `None`.
    pub fn receipt(&self) -> Option<&Signed<JobReceipt>> {
        self.receipt.as_ref()
    }

    /// The QUIC stream id.
    pub fn id(&self) -> u64 {
        self.stream
    }

    pub(super) async fn next_event(&mut self) -> Result<ReaderEvent, TunnelError> {
        if self.receipt.is_some() {
            return Ok(ReaderEvent::Done);
        }
        let result = self.next_event_inner().await;
        if let Err(error) = &result {
            self.frames.stop(error.error_code());
        }
        result
    }

    async fn next_event_inner(&mut self) -> Result<ReaderEvent, TunnelError> {
        match self.frames.next().await? {
            Incoming::Data(bytes) => {
                self.received.add(&bytes);
                Ok(ReaderEvent::Data(bytes))
            }
            Incoming::Empty => {
                self.output_ended = true;
                Ok(ReaderEvent::OutputEnded)
            }
            Incoming::JobEnd(signed) => {
                self.verify_receipt(&signed)?;
                match self.frames.next().await? {
                    Incoming::End => {}
                    _ => return Err(TunnelError::UnexpectedFrame("a frame after the receipt")),
                }
                self.receipt = Some(signed);
                Ok(ReaderEvent::Done)
            }
            Incoming::ClientEnd(_) => Err(TunnelError::UnexpectedFrame("ClientEnd from the job")),
            Incoming::End => Err(TunnelError::MissingReceipt),
        }
    }

    fn verify_receipt(&self, signed: &Signed<JobReceipt>) -> Result<(), TunnelError> {
        let bad = |reason: String| Err(TunnelError::BadReceipt(reason));
        let receipt = match signed.verify_with(&self.job_key) {
            Ok(receipt) => receipt,
            Err(error) => return bad(error.to_string()),
        };
        if receipt.job_id != self.job_id {
            return bad(format!("for job {}, not {}", receipt.job_id, self.job_id));
        }
        if receipt.stream != self.stream {
            return bad(format!(
                "for stream {}, not {}",
                receipt.stream, self.stream
            ));
        }
        let (sent_bytes, sent_digest) = {
            let sent = lock(&self.sent);
            (sent.bytes, sent.digest())
        };
        if receipt.bytes_in != sent_bytes {
            return bad(format!(
                "the job counts {} bytes in, we sent {sent_bytes}",
                receipt.bytes_in
            ));
        }
        if receipt.digest_in != sent_digest {
            return bad("digest_in does not match the bytes we sent".to_owned());
        }
        if receipt.bytes_out != self.received.bytes {
            return bad(format!(
                "the job counts {} bytes out, we received {}",
                receipt.bytes_out, self.received.bytes
            ));
        }
        if receipt.digest_out != self.received.digest() {
            return bad("digest_out does not match the bytes we received".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;
    use crate::test_utils::{job_tunnel, seeded_key};
    use crate::tunnel::http_request;

    /// A job answering every connection with `reply` once the request head is in.
    async fn job_answering(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let _ = tcp.write_all(reply).await;
                });
            }
        });
        addr
    }

    async fn tunnel_to(target: SocketAddr) -> (JobTunnel, crate::tunnel::JobEndpointHandle) {
        job_tunnel(target, 3, 30).await
    }

    #[tokio::test]
    async fn http_request_decodes_a_chunked_reply_and_keeps_the_receipt() {
        let target = job_answering(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Job: yes\r\n\r\n\
              3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .await;
        let (tunnel, handle) = tunnel_to(target).await;
        let response = http_request(&tunnel, "POST", "/run", b"input")
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.header("x-job"), Some("yes"));
        assert_eq!(response.body, b"abcde");
        let receipt = response.receipt.verify_by(&tunnel.job_key()).unwrap();
        assert_eq!(receipt.job_id, tunnel.job_id());
        assert_eq!(handle.shutdown().await, (1, 0));
    }

    #[tokio::test]
    async fn http_request_refuses_bad_requests_and_replies() {
        let target = job_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").await;
        let (tunnel, handle) = tunnel_to(target).await;
        for (method, path) in [("GET", "/a b"), ("", "/"), ("GE\nT", "/"), ("GET", "")] {
            assert!(
                matches!(
                    http_request(&tunnel, method, path, b"").await,
                    Err(TunnelError::Http(_))
                ),
                "{method:?} {path:?}"
            );
        }
        // A truncated body is an error even though the receipt verifies.
        let error = http_request(&tunnel, "GET", "/", b"").await.unwrap_err();
        assert!(matches!(error, TunnelError::Http(_)), "{error}");
        assert_eq!(handle.shutdown().await, (1, 0));
    }

    #[tokio::test]
    async fn a_connection_to_another_key_is_not_a_job_tunnel() {
        let target = job_answering(b"").await;
        let (tunnel, handle) = tunnel_to(target).await;
        let other = seeded_key(99).hotkey();
        let error = JobTunnel::new(
            tunnel.connection().clone(),
            tunnel.job_id(),
            seeded_key(30),
            other,
        )
        .unwrap_err();
        assert!(
            matches!(error, TunnelError::WrongJobKey { expected, .. } if expected == other),
            "{error}"
        );
        handle.shutdown().await;
    }
}
