//! The frame codec: `u32` big-endian length, then a postcard body.
//!
//! The length is checked against a cap *before* anything is allocated, a zero length is an error
//! (no message encodes to zero bytes), and decoding a body refuses trailing bytes. Everything here
//! is sans-IO: the transport reads the 4-byte header, asks [`frame_len`] how much to read, then
//! hands the body to [`from_bytes_exact`].

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Default cap on one control frame: 1 MiB. Job specs, volume lists and records are far smaller;
/// bulk data travels on blob and tunnel streams, never in one control frame.
pub const MAX_FRAME_LEN: u32 = 1024 * 1024;

/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 4;

/// A postcard body that did not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum DecodeError {
    /// postcard refused the bytes (bad tag, bad varint, truncated, bad UTF-8, …).
    #[error("malformed message: {0}")]
    Postcard(String),
    /// The message decoded but bytes were left over.
    #[error("{0} trailing bytes after message")]
    TrailingBytes(usize),
}

/// A frame that cannot be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum FrameError {
    /// A zero-length frame.
    #[error("empty frame")]
    Empty,
    /// The announced length is over the cap.
    #[error("frame of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The cap in force.
        max: u32,
    },
    /// The input ended inside a frame.
    #[error("truncated frame: {needed} more bytes needed")]
    Truncated {
        /// How many bytes are missing.
        needed: usize,
    },
    /// The body did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Encodes a message as postcard bytes (no frame header).
pub fn to_bytes<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // postcard only fails on serializers that cannot be expressed (e.g. maps of unknown length),
    // which our derived types never produce.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// Decodes postcard bytes, refusing trailing bytes.
pub fn from_bytes_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = from_bytes_prefix(bytes)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// Decodes a value from the start of postcard bytes; returns it and the bytes after it.
pub fn from_bytes_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, &[u8]), DecodeError> {
    postcard::take_from_bytes(bytes).map_err(|e| DecodeError::Postcard(e.to_string()))
}

/// Encodes a message as a frame (header + body), refusing one larger than `max`.
pub fn encode_frame<T: Serialize + ?Sized>(value: &T, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0u8; FRAME_HEADER_LEN];
    let body = postcard::to_extend(value, std::mem::take(&mut frame))
        .map_err(|e| DecodeError::Postcard(e.to_string()))?;
    frame = body;
    let len = frame.len() - FRAME_HEADER_LEN;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len as u64 > u64::from(max) {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    frame[..FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Reads the body length from a frame header, checking it against `max` before anyone allocates.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], max: u32) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    Ok(len as usize)
}

/// Decodes one frame from the front of `input`; returns the message and the bytes consumed.
///
/// A short input gives [`FrameError::Truncated`] with how much is missing; callers reading a
/// stream treat that as "read more", callers holding a complete buffer as an error.
pub fn decode_frame<T: DeserializeOwned>(input: &[u8], max: u32) -> Result<(T, usize), FrameError> {
    let Some(header) = input.get(..FRAME_HEADER_LEN) else {
        return Err(FrameError::Truncated {
            needed: FRAME_HEADER_LEN - input.len(),
        });
    };
    let mut header_bytes = [0u8; FRAME_HEADER_LEN];
    header_bytes.copy_from_slice(header);
    let len = frame_len(header_bytes, max)?;
    let end = FRAME_HEADER_LEN + len;
    let Some(body) = input.get(FRAME_HEADER_LEN..end) else {
        return Err(FrameError::Truncated {
            needed: end - input.len(),
        });
    };
    Ok((from_bytes_exact(body)?, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{ControlMessage, DownMessage, UpMessage};

    fn sample() -> ControlMessage {
        ControlMessage::Up(UpMessage::ExecutorReady)
    }

    #[test]
    fn round_trip() {
        let frame = encode_frame(&sample(), MAX_FRAME_LEN).unwrap();
        let (back, used): (ControlMessage, usize) = decode_frame(&frame, MAX_FRAME_LEN).unwrap();
        assert_eq!(back, sample());
        assert_eq!(used, frame.len());
    }

    #[test]
    fn two_frames_in_one_buffer() {
        let mut input = encode_frame(&sample(), MAX_FRAME_LEN).unwrap();
        let second = ControlMessage::Down(DownMessage::Attach(crate::job::JobId([3; 16])));
        input.extend(encode_frame(&second, MAX_FRAME_LEN).unwrap());
        let (first, used): (ControlMessage, _) = decode_frame(&input, MAX_FRAME_LEN).unwrap();
        assert_eq!(first, sample());
        let (next, _): (ControlMessage, _) = decode_frame(&input[used..], MAX_FRAME_LEN).unwrap();
        assert_eq!(next, second);
    }

    #[test]
    fn length_zero_is_refused() {
        assert_eq!(frame_len([0; 4], MAX_FRAME_LEN), Err(FrameError::Empty));
        let r: Result<(ControlMessage, _), _> = decode_frame(&[0, 0, 0, 0, 1], MAX_FRAME_LEN);
        assert_eq!(r.unwrap_err(), FrameError::Empty);
    }

    #[test]
    fn cap_plus_one_and_u32_max_are_refused_without_allocating() {
        let over = (MAX_FRAME_LEN + 1).to_be_bytes();
        assert_eq!(
            frame_len(over, MAX_FRAME_LEN),
            Err(FrameError::TooLarge {
                len: u64::from(MAX_FRAME_LEN) + 1,
                max: MAX_FRAME_LEN
            })
        );
        // A header claiming 4 GiB followed by nothing: refused from the header alone.
        let r: Result<(ControlMessage, _), _> =
            decode_frame(&u32::MAX.to_be_bytes(), MAX_FRAME_LEN);
        assert!(matches!(r, Err(FrameError::TooLarge { len, .. }) if len == u64::from(u32::MAX)));
        assert_eq!(
            frame_len(MAX_FRAME_LEN.to_be_bytes(), MAX_FRAME_LEN),
            Ok(MAX_FRAME_LEN as usize)
        );
    }

    #[test]
    fn truncation_at_every_byte_is_typed() {
        let frame = encode_frame(&sample(), MAX_FRAME_LEN).unwrap();
        for cut in 0..frame.len() {
            let r: Result<(ControlMessage, _), _> = decode_frame(&frame[..cut], MAX_FRAME_LEN);
            assert_eq!(
                r.unwrap_err(),
                FrameError::Truncated {
                    needed: if cut < 4 { 4 - cut } else { frame.len() - cut }
                },
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_refused() {
        let mut body = to_bytes(&sample());
        body.push(0);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend(&body);
        let r: Result<(ControlMessage, _), _> = decode_frame(&frame, MAX_FRAME_LEN);
        assert_eq!(
            r.unwrap_err(),
            FrameError::Decode(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn garbage_postcard_is_refused() {
        let cases: &[&[u8]] = &[
            &[0xff],                         // enum tag 255
            &[0x80, 0x00],                   // overlong varint tag
            &[0xff; 11],                     // 11-byte varint
            &[0x01, 0x7f],                   // Up(…) with an unknown variant
            &[0x00, 0x00, 0xff, 0xff, 0xff], // Down(Submit) with a huge length and no body
        ];
        for body in cases {
            let r: Result<ControlMessage, _> = from_bytes_exact(body);
            assert!(
                matches!(r, Err(DecodeError::Postcard(_))),
                "{body:?}: {r:?}"
            );
        }
    }

    #[test]
    fn huge_declared_sequence_does_not_allocate() {
        // A Vec<u8> claiming u64::MAX elements with a 3-byte body.
        let mut bytes = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        bytes.extend([1, 2, 3]);
        let r: Result<Vec<u8>, _> = from_bytes_exact(&bytes);
        assert!(matches!(r, Err(DecodeError::Postcard(_))));
        let r: Result<Vec<String>, _> = from_bytes_exact(&bytes);
        assert!(matches!(r, Err(DecodeError::Postcard(_))));
    }

    #[test]
    fn encode_refuses_over_cap() {
        let big = vec![7u8; 100];
        assert!(matches!(
            encode_frame(&big, 50),
            Err(FrameError::TooLarge { len: 101, max: 50 })
        ));
    }
}
