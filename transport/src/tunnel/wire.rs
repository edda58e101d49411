//! Tunnel stream framing: `Data` frames written as a header plus the payload (no copy), the
//! other frames through the protocol codec, and a reader that hands `Data` payloads out as
//! slices of its receive buffer.

use bytes::{Bytes, BytesMut};
use horde_protocol::codec::{
    FRAME_HEADER_LEN, FrameError, encode_frame, frame_len, from_bytes_exact,
};
use horde_protocol::records::ClientStreamSignature;
use horde_protocol::{JobReceipt, Signed, TunnelFrame};
use quinn::VarInt;
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::{DATA_CHUNK, MAX_TUNNEL_FRAME_LEN, TunnelError};

/// Non-`Data` frames (`ClientEnd`, `JobEnd`) are a few hundred bytes; anything much larger is
/// refused before it is buffered.
const MAX_END_FRAME_LEN: usize = 4096;

/// postcard's variant index of [`TunnelFrame::Data`].
const DATA_TAG: u8 = 0;

/// Bytes read from a tunnel stream at a time (at most): large enough that a busy stream is
/// forwarded in few large writes.
const READ_BUFFER: usize = 256 * 1024;

/// A `Data` payload length prefix (postcard varint) never needs more than 5 bytes below 4 GiB.
const MAX_VARINT_LEN: usize = 5;

/// One direction's running digest and byte count.
pub(super) struct DirectionDigest {
    hasher: blake3::Hasher,
    pub(super) bytes: u64,
}

impl DirectionDigest {
    pub(super) fn new() -> Self {
        Self {
            hasher: blake3::Hasher::new(),
            bytes: 0,
        }
    }

    pub(super) fn add(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
    }

    pub(super) fn digest(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }
}

/// Encodes `value` as a postcard varint into `out`, returning its length.
fn encode_varint(mut value: usize, out: &mut [u8; MAX_VARINT_LEN]) -> usize {
    let mut len = 0;
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out[len] = byte;
            return len + 1;
        }
        out[len] = byte | 0x80;
        len += 1;
    }
}

/// The bytes preceding a `Data` payload of `len` bytes (`len` ≤ [`DATA_CHUNK`]): frame length,
/// postcard tag, postcard length prefix. Header + payload is exactly the codec's encoding of
/// `TunnelFrame::Data(payload)`.
pub(super) fn data_header(len: usize) -> Bytes {
    let mut varint = [0u8; MAX_VARINT_LEN];
    let varint_len = encode_varint(len, &mut varint);
    let body_len = 1 + varint_len + len;
    let mut header = Vec::with_capacity(FRAME_HEADER_LEN + 1 + varint_len);
    header.extend_from_slice(&(body_len as u32).to_be_bytes());
    header.push(DATA_TAG);
    header.extend_from_slice(&varint[..varint_len]);
    Bytes::from(header)
}

/// Appends `payload` to `chunks` as `Data` frames of at most [`DATA_CHUNK`] bytes (header,
/// piece, header, piece, …), without copying it.
pub(super) fn push_data_frames(mut payload: Bytes, chunks: &mut Vec<Bytes>) {
    while !payload.is_empty() {
        let piece = payload.split_to(payload.len().min(DATA_CHUNK));
        chunks.push(data_header(piece.len()));
        chunks.push(piece);
    }
}

/// Writes `payload` as `Data` frames of at most [`DATA_CHUNK`] bytes, without copying it.
pub(super) async fn write_data(
    send: &mut quinn::SendStream,
    payload: Bytes,
) -> Result<(), TunnelError> {
    let mut chunks = Vec::with_capacity(2);
    push_data_frames(payload, &mut chunks);
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(TunnelError::from_write)
}

/// Writes one whole frame (used for the end frames and the output-ended marker).
pub(super) async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &TunnelFrame,
) -> Result<(), TunnelError> {
    let bytes = encode_frame(frame, MAX_TUNNEL_FRAME_LEN)?;
    send.write_all(&bytes)
        .await
        .map_err(TunnelError::from_write)
}

/// What [`FrameIn::next`] read.
pub(super) enum Incoming {
    /// A piece of a `Data` payload (a payload may arrive in several pieces).
    Data(Bytes),
    /// An empty `Data` frame: from the executor, the output-ended marker.
    Empty,
    ClientEnd(Signed<ClientStreamSignature>),
    JobEnd(Signed<JobReceipt>),
    /// The peer finished the stream at a frame boundary.
    End,
}

/// Reads tunnel frames from a QUIC stream.
///
/// Bytes are read in batches of up to [`READ_BUFFER`] (one read gathers every packet quinn has
/// buffered, so a busy stream costs one TCP write per batch rather than one per packet), and
/// `Data` payloads are handed out as zero-copy slices of that buffer.
///
/// Not cancel-safe: a read dropped in the middle of a frame header desynchronizes the stream.
pub(super) struct FrameIn<R = quinn::RecvStream> {
    recv: R,
    /// Bytes received but not consumed yet.
    buffer: BytesMut,
    /// Payload bytes of the current `Data` frame not handed out yet.
    data_left: usize,
}

impl<R: AsyncRead + Unpin> FrameIn<R> {
    pub(super) fn new(recv: R) -> Self {
        Self {
            recv,
            buffer: BytesMut::new(),
            data_left: 0,
        }
    }

    /// Up to `max` bytes, or `None` at the end of the stream.
    async fn take(&mut self, max: usize) -> Result<Option<Bytes>, TunnelError> {
        if self.buffer.is_empty() {
            self.buffer.reserve(READ_BUFFER);
            let read = self
                .recv
                .read_buf(&mut self.buffer)
                .await
                .map_err(TunnelError::from_io)?;
            if read == 0 {
                return Ok(None);
            }
        }
        let len = max.min(self.buffer.len());
        Ok(Some(self.buffer.split_to(len).freeze()))
    }

    /// Fills `out` as far as the stream allows, returning how many bytes were filled.
    async fn fill(&mut self, out: &mut [u8]) -> Result<usize, TunnelError> {
        let mut filled = 0;
        while filled < out.len() {
            match self.take(out.len() - filled).await? {
                Some(piece) => {
                    out[filled..filled + piece.len()].copy_from_slice(&piece);
                    filled += piece.len();
                }
                None => break,
            }
        }
        Ok(filled)
    }

    async fn fill_exact(&mut self, out: &mut [u8]) -> Result<(), TunnelError> {
        let filled = self.fill(out).await?;
        if filled < out.len() {
            return Err(FrameError::Truncated {
                needed: out.len() - filled,
            }
            .into());
        }
        Ok(())
    }

    /// Reads the postcard length prefix of a `Data` payload within a body of `body_left` bytes;
    /// returns the length and the prefix's size.
    async fn read_varint(&mut self, body_left: usize) -> Result<(usize, usize), TunnelError> {
        let mut value = 0usize;
        for index in 0..MAX_VARINT_LEN.min(body_left) {
            let mut byte = [0u8; 1];
            self.fill_exact(&mut byte).await?;
            value |= usize::from(byte[0] & 0x7f) << (7 * index);
            if byte[0] & 0x80 == 0 {
                return Ok((value, index + 1));
            }
        }
        Err(malformed("bad Data length prefix"))
    }

    /// The next piece of the current `Data` payload (`data_left` > 0).
    async fn data_piece(&mut self) -> Result<Incoming, TunnelError> {
        let Some(piece) = self.take(self.data_left).await? else {
            return Err(FrameError::Truncated {
                needed: self.data_left,
            }
            .into());
        };
        self.data_left -= piece.len();
        Ok(Incoming::Data(piece))
    }

    pub(super) async fn next(&mut self) -> Result<Incoming, TunnelError> {
        if self.data_left > 0 {
            return self.data_piece().await;
        }
        let mut header = [0u8; FRAME_HEADER_LEN];
        match self.fill(&mut header).await? {
            0 => return Ok(Incoming::End),
            FRAME_HEADER_LEN => {}
            filled => {
                return Err(FrameError::Truncated {
                    needed: FRAME_HEADER_LEN - filled,
                }
                .into());
            }
        }
        let len = frame_len(header, MAX_TUNNEL_FRAME_LEN)?;
        let mut tag = [0u8; 1];
        self.fill_exact(&mut tag).await?;
        if tag[0] == DATA_TAG {
            let (payload_len, prefix_len) = self.read_varint(len - 1).await?;
            let used = 1 + prefix_len;
            if used + payload_len != len {
                return Err(if used + payload_len < len {
                    FrameError::Decode(horde_protocol::DecodeError::TrailingBytes(
                        len - used - payload_len,
                    ))
                    .into()
                } else {
                    malformed("Data length prefix exceeds the frame")
                });
            }
            if payload_len == 0 {
                return Ok(Incoming::Empty);
            }
            self.data_left = payload_len;
            return self.data_piece().await;
        }
        if len > MAX_END_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: MAX_END_FRAME_LEN as u32,
            }
            .into());
        }
        let mut body = vec![0u8; len];
        body[0] = tag[0];
        self.fill_exact(&mut body[1..]).await?;
        match from_bytes_exact::<TunnelFrame>(&body).map_err(FrameError::from)? {
            TunnelFrame::ClientEnd(signed) => Ok(Incoming::ClientEnd(signed)),
            TunnelFrame::JobEnd(signed) => Ok(Incoming::JobEnd(signed)),
            _ => Err(TunnelError::UnexpectedFrame("an unknown tunnel frame")),
        }
    }
}

impl FrameIn<quinn::RecvStream> {
    /// Stops the QUIC stream: the peer's further sends fail with `code`.
    pub(super) fn stop(&mut self, code: VarInt) {
        // Already stopped or finished: nothing more to refuse.
        let _ = self.recv.stop(code);
    }
}

fn malformed(reason: &str) -> TunnelError {
    FrameError::Decode(horde_protocol::DecodeError::Postcard(reason.to_owned())).into()
}

#[cfg(test)]
mod tests {
    use horde_protocol::{JobId, SecretKey};

    use super::*;

    #[test]
    fn data_header_plus_payload_is_the_codec_encoding() {
        for len in [1usize, 5, 127, 128, 300, 16_383, 16_384, DATA_CHUNK] {
            let payload = vec![0xa5u8; len];
            let mut ours = data_header(len).to_vec();
            ours.extend_from_slice(&payload);
            let codec = encode_frame(&TunnelFrame::Data(payload), MAX_TUNNEL_FRAME_LEN).unwrap();
            assert_eq!(ours, codec, "len {len}");
        }
    }

    /// One stream's worth of frames, and the offsets where each frame ends.
    fn sample_stream() -> (Vec<u8>, Vec<usize>) {
        let key = SecretKey::from_seed(&[9; 32]);
        let client_end = Signed::sign(
            &key,
            &ClientStreamSignature {
                job_id: JobId([1; 16]),
                stream: 4,
                digest_in: [2; 32],
            },
        );
        let receipt = Signed::sign(
            &key,
            &JobReceipt {
                job_id: JobId([1; 16]),
                stream: 4,
                digest_in: [2; 32],
                digest_out: [3; 32],
                bytes_in: 5,
                bytes_out: 300,
            },
        );
        let mut chunks = Vec::new();
        push_data_frames(Bytes::from_static(b"hello"), &mut chunks);
        push_data_frames(Bytes::from(vec![7u8; 300]), &mut chunks);
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for pair in chunks.chunks(2) {
            bytes.extend_from_slice(&pair[0]);
            bytes.extend_from_slice(&pair[1]);
            ends.push(bytes.len());
        }
        for frame in [
            TunnelFrame::Data(Vec::new()),
            TunnelFrame::ClientEnd(client_end),
            TunnelFrame::JobEnd(receipt),
        ] {
            bytes.extend_from_slice(&encode_frame(&frame, MAX_TUNNEL_FRAME_LEN).unwrap());
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    /// Reads every frame: the data received, how many other frames, and how it ended.
    async fn read_all(input: &[u8]) -> (Vec<u8>, usize, Result<(), TunnelError>) {
        let mut frames = FrameIn::new(input);
        let (mut data, mut others) = (Vec::new(), 0);
        loop {
            match frames.next().await {
                Ok(Incoming::Data(piece)) => {
                    assert!(!piece.is_empty());
                    data.extend_from_slice(&piece);
                }
                Ok(Incoming::Empty | Incoming::ClientEnd(_) | Incoming::JobEnd(_)) => others += 1,
                Ok(Incoming::End) => return (data, others, Ok(())),
                Err(error) => return (data, others, Err(error)),
            }
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_every_truncated_prefix_fails() {
        let (bytes, ends) = sample_stream();
        let (data, others, end) = read_all(&bytes).await;
        end.unwrap();
        let mut expected = b"hello".to_vec();
        expected.extend_from_slice(&[7u8; 300]);
        assert_eq!(data, expected);
        assert_eq!(others, 3);
        for cut in 1..bytes.len() {
            let (_, _, end) = read_all(&bytes[..cut]).await;
            if ends.contains(&cut) {
                end.unwrap();
            } else {
                assert!(
                    matches!(end, Err(TunnelError::Frame(_))),
                    "cut at {cut}: {end:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn oversized_and_inconsistent_frames_are_refused() {
        // A `Data` length prefix larger than its frame.
        let mut bad = 3u32.to_be_bytes().to_vec();
        bad.extend_from_slice(&[DATA_TAG, 9, 0]);
        assert!(matches!(read_all(&bad).await.2, Err(TunnelError::Frame(_))));
        // A `Data` frame with bytes after its payload.
        let mut trailing = 4u32.to_be_bytes().to_vec();
        trailing.extend_from_slice(&[DATA_TAG, 1, 0xaa, 0xbb]);
        assert!(matches!(
            read_all(&trailing).await.2,
            Err(TunnelError::Frame(FrameError::Decode(_)))
        ));
        // An end frame longer than any real one is refused before it is buffered.
        let mut large = (MAX_END_FRAME_LEN as u32 + 1).to_be_bytes().to_vec();
        large.push(1);
        assert!(matches!(
            read_all(&large).await.2,
            Err(TunnelError::Frame(FrameError::TooLarge { .. }))
        ));
        // A frame over the tunnel cap.
        let huge = (MAX_TUNNEL_FRAME_LEN + 1).to_be_bytes();
        assert!(matches!(
            read_all(&huge).await.2,
            Err(TunnelError::Frame(FrameError::TooLarge { .. }))
        ));
    }

    #[test]
    fn tally_counts_and_digests() {
        let mut tally = DirectionDigest::new();
        tally.add(b"hel");
        tally.add(b"lo");
        assert_eq!(tally.bytes, 5);
        assert_eq!(tally.digest(), *blake3::hash(b"hello").as_bytes());
    }
}
