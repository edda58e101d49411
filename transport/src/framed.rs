//! Typed frame channels over a QUIC stream: `u32` big-endian length + postcard body
//! ([`horde_protocol::codec`]).
//!
//! The reading core, [`FrameReader`], works on any [`AsyncRead`] (quinn's `RecvStream`, an
//! in-memory pipe in tests), checks the announced length against the cap before reserving
//! anything, grows its buffer only as bytes actually arrive, and keeps its progress between calls
//! so a `recv` dropped in a `select!` loses nothing.

use horde_protocol::codec::{
    FRAME_HEADER_LEN, FrameError, MAX_FRAME_LEN, encode_frame, frame_len, from_bytes_exact,
};
use quinn::VarInt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt as _};

use crate::codes;

/// Bytes reserved at a time while reading a frame body: a header alone never makes us reserve
/// more than this, so a peer announcing 1 MiB frames on many streams and sending nothing costs
/// 64 KiB per stream, not 1 MiB.
const READ_CHUNK: usize = 64 * 1024;

/// A framed channel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// A frame was refused: empty, over the cap, truncated by the end of the stream, or
    /// undecodable.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Reading the stream failed (reset by the peer, connection lost).
    #[error("reading the stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing the stream failed (stopped by the peer, connection lost).
    #[error("writing the stream: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished or reset locally.
    #[error("stream already closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// An I/O error from a non-QUIC reader.
    #[error("reading: {0}")]
    Io(std::io::Error),
    /// The connection was lost before the peer acknowledged all of a finished stream.
    #[error("waiting for the peer to acknowledge the stream: {0}")]
    Unacknowledged(#[from] quinn::StoppedError),
}

impl ChannelError {
    /// quinn's `AsyncRead` wraps its typed `ReadError` in an `io::Error`; unwrap it again.
    fn from_io(error: std::io::Error) -> Self {
        match error.downcast::<quinn::ReadError>() {
            Ok(read) => Self::Read(read),
            Err(error) => Self::Io(error),
        }
    }
}

/// The application error code to stop a stream with after a frame error.
fn stop_code(error: &FrameError) -> VarInt {
    match error {
        FrameError::TooLarge { .. } => codes::FRAME_TOO_LARGE,
        _ => codes::PROTOCOL_VIOLATION,
    }
}

/// Reads frames from any [`AsyncRead`], keeping partial progress between calls (cancel-safe).
#[derive(Debug)]
pub struct FrameReader {
    max: u32,
    header: [u8; FRAME_HEADER_LEN],
    header_filled: usize,
    /// Length of the body being read, once the header is complete.
    body_len: Option<usize>,
    body: Vec<u8>,
}

impl FrameReader {
    /// A reader refusing frames longer than `max` bytes.
    pub fn new(max: u32) -> Self {
        Self {
            max,
            header: [0; FRAME_HEADER_LEN],
            header_filled: 0,
            body_len: None,
            body: Vec::new(),
        }
    }

    /// The next message: `Ok(None)` if the input ends cleanly between frames.
    ///
    /// Cancel-safe: dropping the future keeps the bytes read so far for the next call. After an
    /// error the reader starts over at a frame boundary, but the input it reads is desynchronized:
    /// callers abandon the stream.
    pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Option<T>, ChannelError> {
        let result = self.read_inner(reader).await;
        if result.is_err() {
            self.reset();
        }
        result
    }

    async fn read_inner<T: DeserializeOwned, R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Option<T>, ChannelError> {
        let len = loop {
            if let Some(len) = self.body_len {
                break len;
            }
            if self.header_filled == FRAME_HEADER_LEN {
                let len = frame_len(self.header, self.max)?;
                self.body = Vec::with_capacity(len.min(READ_CHUNK));
                self.body_len = Some(len);
                continue;
            }
            let read = reader
                .read(&mut self.header[self.header_filled..])
                .await
                .map_err(ChannelError::from_io)?;
            if read == 0 {
                if self.header_filled == 0 {
                    return Ok(None);
                }
                return Err(FrameError::Truncated {
                    needed: FRAME_HEADER_LEN - self.header_filled,
                }
                .into());
            }
            self.header_filled += read;
        };
        while self.body.len() < len {
            let missing = len - self.body.len();
            if self.body.capacity() == self.body.len() {
                self.body.reserve_exact(missing.min(READ_CHUNK));
            }
            let read = (&mut *reader)
                .take(missing as u64)
                .read_buf(&mut self.body)
                .await
                .map_err(ChannelError::from_io)?;
            if read == 0 {
                return Err(FrameError::Truncated { needed: missing }.into());
            }
        }
        let body = std::mem::take(&mut self.body);
        self.reset();
        Ok(Some(from_bytes_exact(&body).map_err(FrameError::from)?))
    }

    fn reset(&mut self) {
        self.header_filled = 0;
        self.body_len = None;
        self.body = Vec::new();
    }
}

/// The sending half of a framed channel.
#[derive(Debug)]
pub struct FramedSend {
    stream: quinn::SendStream,
    max: u32,
}

impl FramedSend {
    /// Frames messages onto `stream`, refusing to send one longer than `max`.
    pub fn new(stream: quinn::SendStream, max: u32) -> Self {
        Self { stream, max }
    }

    /// Encodes and writes one message. Not cancel-safe: a dropped send may leave half a frame.
    pub async fn send<T: Serialize + ?Sized>(&mut self, message: &T) -> Result<(), ChannelError> {
        let frame = encode_frame(message, self.max)?;
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// Ends the stream cleanly after what was sent (the peer reads `None`).
    pub fn finish(&mut self) -> Result<(), ChannelError> {
        self.stream.finish()?;
        Ok(())
    }

    /// After [`FramedSend::finish`]: waits until the peer has acknowledged receiving every byte
    /// of the stream (not necessarily processed it), or stopped it. An error means the
    /// connection was lost first, so the peer may lack part of what was written.
    pub async fn delivered(&mut self) -> Result<(), ChannelError> {
        self.stream.stopped().await?;
        Ok(())
    }

    /// Abandons the stream with an application error code.
    pub fn reset(&mut self, code: VarInt) {
        // Already finished or reset: nothing left to abandon.
        let _ = self.stream.reset(code);
    }

    /// The underlying stream.
    pub fn stream_mut(&mut self) -> &mut quinn::SendStream {
        &mut self.stream
    }
}

/// The receiving half of a framed channel.
#[derive(Debug)]
pub struct FramedRecv {
    stream: quinn::RecvStream,
    reader: FrameReader,
}

impl FramedRecv {
    /// Reads frames from `stream`, refusing any longer than `max`.
    pub fn new(stream: quinn::RecvStream, max: u32) -> Self {
        Self {
            stream,
            reader: FrameReader::new(max),
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream at a frame boundary.
    ///
    /// On a frame error the stream is stopped with [`codes::FRAME_TOO_LARGE`] or
    /// [`codes::PROTOCOL_VIOLATION`] so the peer stops sending. Cancel-safe.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ChannelError> {
        let result = self.reader.read(&mut self.stream).await;
        if let Err(ChannelError::Frame(error)) = &result {
            // The stream may already be stopped; either way the peer gets the code once.
            let _ = self.stream.stop(stop_code(error));
        }
        result
    }

    /// Tells the peer to stop sending, with an application error code.
    pub fn stop(&mut self, code: VarInt) {
        // Already stopped or finished: nothing more to refuse.
        let _ = self.stream.stop(code);
    }

    /// The underlying stream.
    pub fn stream_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.stream
    }
}

/// Wraps the two halves of a bidirectional stream as framed channels with the default cap
/// ([`MAX_FRAME_LEN`]).
pub fn split(send: quinn::SendStream, recv: quinn::RecvStream) -> (FramedSend, FramedRecv) {
    (
        FramedSend::new(send, MAX_FRAME_LEN),
        FramedRecv::new(recv, MAX_FRAME_LEN),
    )
}

#[cfg(test)]
mod tests {
    use horde_protocol::codec::{DecodeError, to_bytes};
    use horde_protocol::{ControlMessage, DownMessage, JobId, UpMessage};
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    fn sample() -> ControlMessage {
        ControlMessage::Up(UpMessage::ExecutorReady)
    }

    fn frame(message: &ControlMessage) -> Vec<u8> {
        encode_frame(message, MAX_FRAME_LEN).unwrap()
    }

    async fn read_all(mut input: &[u8]) -> Vec<Result<Option<ControlMessage>, ChannelError>> {
        let mut reader = FrameReader::new(MAX_FRAME_LEN);
        let mut results = Vec::new();
        loop {
            let result = reader.read::<ControlMessage, _>(&mut input).await;
            let done = !matches!(result, Ok(Some(_)));
            results.push(result);
            if done {
                return results;
            }
        }
    }

    async fn read_one(input: &[u8]) -> Result<Option<ControlMessage>, ChannelError> {
        let mut input = input;
        FrameReader::new(MAX_FRAME_LEN).read(&mut input).await
    }

    fn frame_error(result: Result<Option<ControlMessage>, ChannelError>) -> FrameError {
        match result {
            Err(ChannelError::Frame(error)) => error,
            other => panic!("expected a frame error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn clean_end_of_stream_is_none() {
        assert!(matches!(read_one(&[]).await, Ok(None)));
    }

    #[tokio::test]
    async fn two_frames_back_to_back_then_none() {
        let second = ControlMessage::Down(DownMessage::Attach(JobId([7; 16])));
        let mut input = frame(&sample());
        input.extend(frame(&second));
        let results = read_all(&input).await;
        assert_eq!(results.len(), 3);
        assert_eq!(results[0].as_ref().unwrap().as_ref(), Some(&sample()));
        assert_eq!(results[1].as_ref().unwrap().as_ref(), Some(&second));
        assert!(matches!(results[2], Ok(None)));
    }

    #[tokio::test]
    async fn length_zero_is_refused() {
        let error = frame_error(read_one(&[0, 0, 0, 0, 1, 2]).await);
        assert_eq!(error, FrameError::Empty);
    }

    #[tokio::test]
    async fn cap_plus_one_is_refused() {
        let mut input = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
        input.extend([0; 16]);
        assert_eq!(
            frame_error(read_one(&input).await),
            FrameError::TooLarge {
                len: u64::from(MAX_FRAME_LEN) + 1,
                max: MAX_FRAME_LEN
            }
        );
    }

    #[tokio::test]
    async fn u32_max_is_refused_from_the_header_alone() {
        // Only the 4-byte header exists: the error comes before any body is awaited or reserved.
        let mut input: &[u8] = &u32::MAX.to_be_bytes();
        let mut reader = FrameReader::new(MAX_FRAME_LEN);
        let error = frame_error(reader.read(&mut input).await);
        assert_eq!(
            error,
            FrameError::TooLarge {
                len: u64::from(u32::MAX),
                max: MAX_FRAME_LEN
            }
        );
        assert_eq!(reader.body.capacity(), 0);
    }

    #[tokio::test]
    async fn announced_length_is_not_reserved_up_front() {
        // A header announcing the full cap with a pipe that never delivers the body: the reader
        // reserves one chunk, not the announced megabyte.
        let (mut writer, mut pipe) = tokio::io::duplex(64);
        writer
            .write_all(&MAX_FRAME_LEN.to_be_bytes())
            .await
            .unwrap();
        let mut reader = FrameReader::new(MAX_FRAME_LEN);
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            reader.read::<ControlMessage, _>(&mut pipe),
        )
        .await;
        assert!(pending.is_err(), "body never arrives");
        assert!(reader.body.capacity() <= READ_CHUNK);
        assert_eq!(reader.body_len, Some(MAX_FRAME_LEN as usize));
    }

    #[tokio::test]
    async fn truncated_header_is_typed() {
        for cut in 1..FRAME_HEADER_LEN {
            let input = frame(&sample());
            assert_eq!(
                frame_error(read_one(&input[..cut]).await),
                FrameError::Truncated {
                    needed: FRAME_HEADER_LEN - cut
                },
                "cut at {cut}"
            );
        }
    }

    #[tokio::test]
    async fn truncated_body_is_typed() {
        let input = frame(&sample());
        for cut in FRAME_HEADER_LEN..input.len() {
            assert_eq!(
                frame_error(read_one(&input[..cut]).await),
                FrameError::Truncated {
                    needed: input.len() - cut
                },
                "cut at {cut}"
            );
        }
        // A whole frame then half of the next.
        let mut input = frame(&sample());
        let second = frame(&sample());
        input.extend(&second[..second.len() - 1]);
        let results = read_all(&input).await;
        assert!(matches!(results[0], Ok(Some(_))));
        assert!(matches!(
            results[1],
            Err(ChannelError::Frame(FrameError::Truncated { .. }))
        ));
    }

    #[tokio::test]
    async fn trailing_bytes_inside_a_frame_are_refused() {
        let mut body = to_bytes(&sample());
        body.push(0);
        let mut input = (body.len() as u32).to_be_bytes().to_vec();
        input.extend(&body);
        assert_eq!(
            frame_error(read_one(&input).await),
            FrameError::Decode(DecodeError::TrailingBytes(1))
        );
    }

    #[tokio::test]
    async fn garbage_postcard_is_refused() {
        let input = [0, 0, 0, 2, 0xff, 0xff];
        assert!(matches!(
            frame_error(read_one(&input).await),
            FrameError::Decode(DecodeError::Postcard(_))
        ));
    }

    #[tokio::test]
    async fn reading_survives_cancellation_and_dribbled_bytes() {
        let (mut writer, mut pipe) = tokio::io::duplex(4);
        let input = frame(&sample());
        let mut reader = FrameReader::new(MAX_FRAME_LEN);
        let mut received = None;
        for byte in &input {
            // Every attempt but the last is cancelled after consuming its byte.
            writer.write_all(&[*byte]).await.unwrap();
            if let Ok(result) = tokio::time::timeout(
                std::time::Duration::from_millis(5),
                reader.read::<ControlMessage, _>(&mut pipe),
            )
            .await
            {
                assert!(received.is_none(), "one message only");
                received = result.unwrap();
            }
        }
        assert_eq!(received, Some(sample()));
        drop(writer);
        assert!(
            reader
                .read::<ControlMessage, _>(&mut pipe)
                .await
                .unwrap()
                .is_none()
        );
    }
}
