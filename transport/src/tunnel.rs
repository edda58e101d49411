//! The job tunnel (`horde/job/1`): one bidirectional QUIC stream per client TCP connection,
//! carrying the bytes between a client and the job's local TCP port, and ending with signatures
//! from both sides over what passed.
//!
//! **Wire.** Each direction of a tunnel stream is a sequence of [`TunnelFrame`]s in the protocol
//! codec (`u32` big-endian length + postcard body, at most [`MAX_TUNNEL_FRAME_LEN`]). `Data`
//! frames are written as a header (length, postcard tag, postcard length prefix) followed by the
//! payload, and read without copying the payload (quinn's chunks are handed out as [`Bytes`]).
//!
//! **Stream id convention.** The `stream` field of [`ClientStreamSignature`] and [`JobReceipt`]
//! is the full QUIC stream id, `u64::from(stream.id())` (it includes the initiator and direction
//! bits: the client's bidirectional streams are 0, 4, 8, …). Both sides read the same number
//! from their half of the stream.
//!
//! **Ending a stream.**
//! - The client sends `Data` frames, then `ClientEnd` (its signature over the job id, the stream
//!   id and the BLAKE3 digest of every byte it sent), then finishes its side. It lets the data go
//!   out before it signs, so the job starts on a request while the signature is made.
//! - The executor ([`serve_tunnel_stream`]) forwards client bytes to the job over TCP. When
//!   `ClientEnd` arrives it checks at once what costs nothing: the signer is the spec's client
//!   key, and the job, stream and digest are this stream's and what arrived (a mismatch resets
//!   the stream, [`TunnelError::BadClientSignature`]); then it shuts down the TCP write half. It
//!   forwards the job's output until the job closes TCP (EOF). Then it sends an **empty `Data`
//!   frame** (the *output-ended marker*: the job will send nothing more, so a forwarder can pass
//!   the EOF on to its local client) — at once if the client is still sending, otherwise in the
//!   same write as the receipt. Once both the job's EOF and `ClientEnd` are in, it sends
//!   `JobEnd` (the receipt, signed by the job key) and finishes. Only then does it check
//!   `ClientEnd`'s signature: the receipt attests what the executor itself forwarded and does
//!   not depend on it, so the check stays off the reply's path; a signature that does not verify
//!   fails the stream in the executor's records (the error, and no receipt logged as served).
//! - If the job closes first and `ClientEnd` does not arrive within [`CLIENT_END_GRACE`] of the
//!   job's EOF, the executor sends the receipt anyway, with the digest of what it had received,
//!   and stops reading. In the normal case (a client that finishes after reading the response,
//!   or before) the receipt always arrives before the stream ends.
//! - The client ([`TunnelStream::read`]) verifies the receipt: signed by the pinned job key, same
//!   job id and stream id, `digest_in`/`bytes_in` equal to what it sent and
//!   `digest_out`/`bytes_out` equal to what it received. Any mismatch is
//!   [`TunnelError::BadReceipt`]; a stream that ends without one is
//!   [`TunnelError::MissingReceipt`].
//!
//! Entry points: [`serve_job_endpoint`] / [`serve_tunnel_stream`] (executor side); on the client,
//! [`JobTunnel`] (a job connection whose peer was checked once against the pinned job key) opens
//! [`TunnelStream`]s, [`http_request`] sends one HTTP/1.1 request through one stream, and
//! [`forward_tcp`] tunnels a local TCP port to the job.
//!
//! Layout:
//! - `tunnel/wire.rs`: `Data` frame headers (postcard varints), the frame writer and the
//!   zero-copy frame reader, the running digest of one direction.
//! - `tunnel/server.rs`: the executor side: [`serve_tunnel_stream`], [`serve_job_endpoint`].
//! - `tunnel/client.rs`: [`JobTunnel`], [`TunnelStream`] and its halves.
//! - `tunnel/request.rs`: one HTTP/1.1 request per stream: [`http_request_streaming`] (the
//!   body's exact bytes as they arrive, then the receipt) and [`http_request`] (buffered).
//! - `tunnel/forward.rs`: [`forward_tcp`], a local TCP port tunnelled to the job.

use std::time::Duration;

use horde_protocol::Hotkey;
use horde_protocol::codec::{FrameError, MAX_FRAME_LEN};
use quinn::VarInt;

use crate::codes;

mod client;
mod forward;
mod request;
mod server;
mod wire;

pub use client::{JobTunnel, TunnelReader, TunnelStream, TunnelWriter};
pub use forward::forward_tcp;
pub use request::{
    HttpResponse, HttpResponseStream, MAX_RESPONSE_HEAD, RequestBody, http_request,
    http_request_streaming, http_request_streaming_with_headers,
};
pub use server::{
    JobConnector, JobEndpointHandle, TunnelContext, TunnelStats, serve_job_endpoint,
    serve_job_endpoint_on_own_thread, serve_tunnel_stream,
};

/// The largest tunnel frame accepted: a full [`MAX_FRAME_LEN`] `Data` payload plus its postcard
/// tag and length prefix.
pub const MAX_TUNNEL_FRAME_LEN: u32 = MAX_FRAME_LEN + 16;

/// The largest `Data` payload we send. Large enough that framing costs nothing next to the
/// payload, small enough that a frame never waits long for flow-control credit.
pub const DATA_CHUNK: usize = 256 * 1024;

/// How long the executor waits for the client's `ClientEnd` after the job closed its side before
/// it sends the receipt with what it received so far.
pub const CLIENT_END_GRACE: Duration = Duration::from_secs(5);

/// How long [`JobEndpointHandle::drain`] lets the streams in flight run once the job has ended:
/// a stream ends as soon as the job's side has closed and the client has sent `ClientEnd`,
/// and at most [`CLIENT_END_GRACE`] after the job's side closed; one more second covers
/// sending the receipt.
pub const DRAIN_GRACE: Duration = Duration::from_secs(CLIENT_END_GRACE.as_secs() + 1);

/// How long connecting to the job's local TCP port may take.
pub const JOB_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Tunnel streams served at once by one job endpoint, over all its connections. Further streams
/// wait for a slot (quinn's per-connection stream limit applies as well).
pub const MAX_TUNNEL_STREAMS: usize = 256;

/// Local TCP connections [`forward_tcp`] tunnels at once; further ones wait to be accepted.
pub const MAX_FORWARDED_CONNECTIONS: usize = 256;

/// Receipts a [`JobEndpointHandle`] keeps (the oldest are dropped first): the executor logs them,
/// it does not need every one in memory.
pub const MAX_KEPT_RECEIPTS: usize = 4096;

/// The largest response [`http_request`] buffers ([`http_request_streaming`] holds none).
pub const MAX_HTTP_RESPONSE: usize = 256 * 1024 * 1024;

/// A tunnel stream failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// A frame was refused: empty, over the cap, truncated, or undecodable.
    #[error("bad tunnel frame: {0}")]
    Frame(#[from] FrameError),
    /// A frame the protocol does not allow at this point (e.g. `JobEnd` from the client).
    #[error("unexpected frame: {0}")]
    UnexpectedFrame(&'static str),
    /// The client's `ClientEnd` does not verify under the spec's client key or does not match
    /// the stream.
    #[error("the client's end-of-stream signature is invalid: {0}")]
    BadClientSignature(String),
    /// The client finished its side without sending `ClientEnd`.
    #[error("the client finished the stream without signing what it sent")]
    MissingClientEnd,
    /// The job's receipt does not verify or does not match what passed.
    #[error("bad receipt: {0}")]
    BadReceipt(String),
    /// The stream ended without a receipt.
    #[error("the tunnel stream ended without a receipt")]
    MissingReceipt,
    /// The connection's peer is not the pinned job key.
    #[error("the connection's peer is {actual}, not the job key {expected}")]
    WrongJobKey {
        /// The pinned job key.
        expected: Hotkey,
        /// What the connection presented.
        actual: String,
    },
    /// The peer reset its side of the stream.
    #[error("stream reset by the peer (code {0})")]
    Reset(VarInt),
    /// The peer stopped reading the stream.
    #[error("stream stopped by the peer (code {0})")]
    Stopped(VarInt),
    /// The connection was lost or closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Reading the stream failed otherwise.
    #[error("reading the tunnel stream: {0}")]
    Read(quinn::ReadError),
    /// Writing the stream failed otherwise.
    #[error("writing the tunnel stream: {0}")]
    Write(quinn::WriteError),
    /// Reading the stream failed with an error quinn did not type.
    #[error("reading the tunnel stream: {0}")]
    StreamIo(std::io::Error),
    /// Writing after `finish_sending`.
    #[error("the stream was already finished")]
    Finished,
    /// The job's TCP port could not be reached.
    #[error("connecting to the job at {target}: {source}")]
    JobConnect {
        /// How the job was to be reached (its address, or the runner's dialer).
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// Reading from the job's TCP connection failed.
    #[error("job connection: {0}")]
    Job(std::io::Error),
    /// The local TCP side of a forwarder failed.
    #[error("local connection: {0}")]
    Local(std::io::Error),
    /// An HTTP request could not be made or its response could not be parsed.
    #[error("HTTP: {0}")]
    Http(String),
}

impl TunnelError {
    /// quinn's `AsyncRead` wraps its typed `ReadError` in an `io::Error`; unwrap it again.
    pub(crate) fn from_io(error: std::io::Error) -> Self {
        match error.downcast::<quinn::ReadError>() {
            Ok(read) => Self::from_read(read),
            Err(error) => Self::StreamIo(error),
        }
    }

    pub(crate) fn from_read(error: quinn::ReadError) -> Self {
        match error {
            quinn::ReadError::Reset(code) => Self::Reset(code),
            quinn::ReadError::ConnectionLost(error) => Self::Connection(error),
            other => Self::Read(other),
        }
    }

    pub(crate) fn from_write(error: quinn::WriteError) -> Self {
        match error {
            quinn::WriteError::Stopped(code) => Self::Stopped(code),
            quinn::WriteError::ConnectionLost(error) => Self::Connection(error),
            other => Self::Write(other),
        }
    }

    /// The application error code a stream is reset or stopped with after this error.
    pub fn error_code(&self) -> VarInt {
        match self {
            Self::Frame(FrameError::TooLarge { .. }) => codes::FRAME_TOO_LARGE,
            Self::Frame(_)
            | Self::UnexpectedFrame(_)
            | Self::BadClientSignature(_)
            | Self::MissingClientEnd
            | Self::BadReceipt(_)
            | Self::MissingReceipt => codes::PROTOCOL_VIOLATION,
            Self::JobConnect { .. } | Self::Job(_) => codes::INTERNAL,
            _ => codes::CANCELLED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_codes_a_stream_is_reset_with() {
        let too_large = TunnelError::Frame(FrameError::TooLarge { len: 10, max: 5 });
        assert_eq!(too_large.error_code(), codes::FRAME_TOO_LARGE);
        for violation in [
            TunnelError::UnexpectedFrame("x"),
            TunnelError::BadClientSignature(String::new()),
            TunnelError::MissingClientEnd,
            TunnelError::BadReceipt(String::new()),
            TunnelError::MissingReceipt,
        ] {
            assert_eq!(
                violation.error_code(),
                codes::PROTOCOL_VIOLATION,
                "{violation}"
            );
        }
        let job = TunnelError::Job(std::io::Error::other("gone"));
        assert_eq!(job.error_code(), codes::INTERNAL);
        assert_eq!(TunnelError::Finished.error_code(), codes::CANCELLED);
    }

    #[test]
    fn quinn_errors_keep_their_codes() {
        let code = VarInt::from_u32(42);
        assert!(matches!(
            TunnelError::from_read(quinn::ReadError::Reset(code)),
            TunnelError::Reset(c) if c == code
        ));
        assert!(matches!(
            TunnelError::from_write(quinn::WriteError::Stopped(code)),
            TunnelError::Stopped(c) if c == code
        ));
        let wrapped = std::io::Error::from(quinn::ReadError::Reset(code));
        assert!(matches!(TunnelError::from_io(wrapped), TunnelError::Reset(c) if c == code));
        let other = std::io::Error::other("plain");
        assert!(matches!(
            TunnelError::from_io(other),
            TunnelError::StreamIo(_)
        ));
    }

    #[test]
    fn the_largest_data_frame_fits_the_tunnel_cap() {
        // A full payload plus its tag and length prefix.
        assert!(MAX_FRAME_LEN as usize + 1 + 5 <= MAX_TUNNEL_FRAME_LEN as usize);
        assert!(DATA_CHUNK <= MAX_FRAME_LEN as usize);
        assert!(DRAIN_GRACE > CLIENT_END_GRACE);
    }
}
