//! The `horde/blob/1` protocol over QUIC: one bidirectional stream per request.
//!
//! The messages and the verification tree are sans-IO in [`horde_protocol::blob`]; this module
//! moves them over quinn streams:
//! - client side: [`request_get`] returns a [`GetStream`] whose [`GetStream::next`] yields only
//!   *verified* data (every chunk group checked against the root hash before it is handed out),
//!   or receives the whole blob into a [`BlobBuffer`] (`blob/buffer.rs`: memory faulted in ahead
//!   of the data for large blobs), a `Vec` or a [`VerifiedSink`];
//!   [`start_put`] returns a [`PutUpload`]; [`stat`] asks what the store holds.
//! - server side: [`read_request`], [`write_response`] and [`serve_get`], which streams a
//!   [`ServedBlob`] (bytes plus outboard, in memory or in files).
//!
//! A receiver that finds a bad chunk group stops the stream with [`STOP_INTEGRITY`] and returns
//! [`BlobError::Integrity`]; data verified before the failure is still handed out first, so a
//! resume never re-fetches more than one chunk group beyond what is missing.
//!
//! Both sides give up on a stream that makes no progress for a *progress timeout*
//! ([`PROGRESS_TIMEOUT`] by default): the receiver when no byte arrives, the server when the
//! peer takes none of what it sends. QUIC keep-alives keep a silent peer's connection open, so
//! only this tells a stalled transfer from a slow one. The operation then fails with
//! [`BlobError::Stalled`]; a receiver stops the stream with [`codes::TIMED_OUT`].
//!
//! Layout:
//! - `blob/serve.rs`: the server side: [`ServedBlob`] (bytes and outboard, in memory or in
//!   files) and [`serve_get`].
//! - `blob/get.rs`: the client side of `Get`: [`request_get`] and [`GetStream`].
//! - `blob/verify.rs`: the verifier that checks each chunk group against the root hash in the
//!   destination's memory before handing it on.
//! - `blob/sink.rs`: where verified bytes go: [`VerifiedSink`] and the sinks behind
//!   [`GetStream::next`], [`GetStream::read_to_vec`] / [`GetStream::read_to_buffer`] and
//!   [`GetStream::read_to_sink`].
//! - `blob/put.rs`: [`stat`], [`start_put`] / [`PutUpload`], [`put_bytes`].
//! - `blob/buffer.rs`: [`BlobBuffer`], memory faulted in ahead of the data for large blobs.

use std::io;
use std::time::Duration;

use horde_protocol::BlobHash;
use horde_protocol::blob::{
    BlobErrorKind, BlobRequest, BlobResponse, MAX_REQUEST_LEN, MAX_RESPONSE_LEN,
};
use horde_protocol::codec::encode_frame;
use horde_protocol::wire::blob_stop;
use quinn::VarInt;
use serde::de::DeserializeOwned;

use crate::framed::{ChannelError, FrameReader};

mod buffer;
mod get;
mod put;
mod serve;
mod sink;
mod verify;

pub use buffer::{BlobBuffer, MAPPED_MIN};
pub use get::{GetStream, PROGRESS_INTERVAL, VerifiedData, request_get};
pub use put::{PutUpload, put_bytes, start_put, stat};
pub use serve::{Backing, ServedBlob, serve_get};
pub use sink::{SINK_ALIGN, SINK_BATCH, VerifiedSink};

/// Stream stop code: the receiver found data that does not match the hash
/// ([`blob_stop::INTEGRITY`]).
pub const STOP_INTEGRITY: VarInt = VarInt::from_u32(blob_stop::INTEGRITY);
/// Stream stop code: the receiver refuses a blob larger than its limit
/// ([`blob_stop::TOO_LARGE`]).
pub const STOP_TOO_LARGE: VarInt = VarInt::from_u32(blob_stop::TOO_LARGE);
/// Stream stop code: the receiver no longer wants the data (cancelled, local failure)
/// ([`blob_stop::CANCELLED`]).
pub const STOP_CANCELLED: VarInt = VarInt::from_u32(blob_stop::CANCELLED);

/// Default progress timeout of a blob stream: 30 s without a byte received, or without the peer
/// taking any of what we send. Three idle timeouts ([`crate::MAX_IDLE_TIMEOUT`]): far longer
/// than any pause a healthy peer makes (the sender writes at most a 1 MiB piece at a time, so a
/// reader taking 35 kB/s never trips it), short enough that a peer that stops reading or
/// sending releases its stream, memory and file handles within half a minute.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

/// A blob transfer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// Data from the peer does not match the hash; nothing from `offset` on was accepted.
    #[error("integrity check failed at byte {offset}: the data does not match the blob hash")]
    Integrity {
        /// First byte of the chunk group (or segment) that failed.
        offset: u64,
    },
    /// The storage node does not hold the blob.
    #[error("blob {0} not found")]
    NotFound(BlobHash),
    /// The storage node refused the request.
    #[error("refused by the storage node ({kind:?}): {message}")]
    Refused {
        /// Why.
        kind: BlobErrorKind,
        /// The node's explanation.
        message: String,
    },
    /// The blob is larger than the limit in force.
    #[error("blob of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The peer broke the protocol (unexpected message, bad offsets).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A frame was refused or a framed read failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The stream ended before all expected bytes arrived.
    #[error("stream ended early: {missing} bytes missing")]
    Truncated {
        /// Bytes still expected.
        missing: u64,
    },
    /// Reading the stream failed (reset by the peer, connection lost).
    #[error("reading the stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing the stream failed (stopped by the peer, connection lost).
    #[error("writing the stream: {0}")]
    Write(#[from] quinn::WriteError),
    /// The connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A local I/O error (reading the blob from disk).
    #[error("local I/O: {0}")]
    Io(#[from] io::Error),
    /// The stream made no progress for the progress timeout: the peer sent nothing, or took
    /// nothing of what we sent, for that long.
    #[error("the stream made no progress for {idle:.1?}")]
    Stalled {
        /// The progress timeout that expired.
        idle: Duration,
    },
}

impl BlobError {
    /// Whether retrying on a new connection may succeed (the connection or stream was lost).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Read(_)
            | Self::Write(_)
            | Self::Connection(_)
            | Self::Truncated { .. }
            | Self::Stalled { .. } => true,
            Self::Channel(ChannelError::Read(_) | ChannelError::Write(_)) => true,
            Self::Refused { kind, .. } => *kind == BlobErrorKind::Busy,
            _ => false,
        }
    }
}

/// Runs one step of a transfer that needs the peer (a read, a write), failing with
/// [`BlobError::Stalled`] if it makes no progress within `limit`.
pub async fn within_progress_timeout<T, E: Into<BlobError>>(
    limit: Duration,
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, BlobError> {
    match tokio::time::timeout(limit, step).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(BlobError::Stalled { idle: limit }),
    }
}

/// Writes one response frame.
pub async fn write_response(
    send: &mut quinn::SendStream,
    response: &BlobResponse,
) -> Result<(), BlobError> {
    let frame = encode_frame(response, MAX_RESPONSE_LEN).map_err(ChannelError::from)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Writes one request frame.
pub(crate) async fn write_request(
    send: &mut quinn::SendStream,
    request: &BlobRequest,
) -> Result<(), BlobError> {
    let frame = encode_frame(request, MAX_REQUEST_LEN).map_err(ChannelError::from)?;
    send.write_all(&frame).await?;
    Ok(())
}

async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: u32,
) -> Result<Option<T>, BlobError> {
    Ok(FrameReader::new(max).read(recv).await?)
}

/// Reads the request frame that opens a blob stream (capped at [`MAX_REQUEST_LEN`], checked
/// before allocating). `Ok(None)` if the stream ended without one.
pub async fn read_request(recv: &mut quinn::RecvStream) -> Result<Option<BlobRequest>, BlobError> {
    read_frame(recv, MAX_REQUEST_LEN).await
}

pub(crate) async fn read_response(recv: &mut quinn::RecvStream) -> Result<BlobResponse, BlobError> {
    read_frame(recv, MAX_RESPONSE_LEN)
        .await?
        .ok_or(BlobError::Truncated { missing: 1 })
}

pub(crate) fn refused(kind: BlobErrorKind, message: String) -> BlobError {
    BlobError::Refused { kind, message }
}

pub(crate) fn unexpected(response: &BlobResponse) -> BlobError {
    BlobError::Protocol(format!("unexpected response {response:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_streams_and_busy_stores_are_worth_a_retry_bad_data_is_not() {
        assert!(BlobError::Truncated { missing: 1 }.is_transient());
        assert!(
            BlobError::Stalled {
                idle: PROGRESS_TIMEOUT
            }
            .is_transient()
        );
        assert!(refused(BlobErrorKind::Busy, String::new()).is_transient());
        assert!(!refused(BlobErrorKind::BadRequest, String::new()).is_transient());
        assert!(!BlobError::Integrity { offset: 0 }.is_transient());
        assert!(!BlobError::NotFound(BlobHash::of(b"")).is_transient());
        assert!(!BlobError::TooLarge { size: 2, max: 1 }.is_transient());
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_without_progress_is_stalled() {
        let limit = Duration::from_secs(3);
        let stalled =
            within_progress_timeout(limit, std::future::pending::<Result<(), BlobError>>());
        assert!(matches!(stalled.await, Err(BlobError::Stalled { idle }) if idle == limit));
        let done = within_progress_timeout(limit, async { Ok::<_, BlobError>(7) });
        assert_eq!(done.await.unwrap(), 7);
    }

    #[test]
    fn stop_codes_are_the_wire_table_s() {
        assert_eq!(STOP_INTEGRITY.into_inner(), u64::from(blob_stop::INTEGRITY));
        assert_eq!(STOP_TOO_LARGE.into_inner(), u64::from(blob_stop::TOO_LARGE));
        assert_eq!(STOP_CANCELLED.into_inner(), u64::from(blob_stop::CANCELLED));
    }
}
