//! WebSocket (RFC 6455) for the demo job: the opening handshake (`Sec-WebSocket-Accept` =
//! base64(SHA-1(key ‖ GUID)), with SHA-1 and base64 written out here), frame encoding and
//! decoding, and the echo loop. [`encode_frame`] and [`decode_frame`] also serve test clients,
//! which must mask their frames.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::http::{HttpConnection, Request, respond};

/// The GUID RFC 6455 appends to the client's key.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The largest message (after reassembly of fragments) the echo accepts.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Continuation frame.
pub const OPCODE_CONTINUATION: u8 = 0x0;
/// Text frame.
pub const OPCODE_TEXT: u8 = 0x1;
/// Binary frame.
pub const OPCODE_BINARY: u8 = 0x2;
/// Close frame.
pub const OPCODE_CLOSE: u8 = 0x8;
/// Ping frame.
pub const OPCODE_PING: u8 = 0x9;
/// Pong frame.
pub const OPCODE_PONG: u8 = 0xA;

/// Close code: protocol error.
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code: message too big.
const CLOSE_TOO_BIG: u16 = 1009;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The final fragment of a message.
    pub fin: bool,
    /// The opcode.
    pub opcode: u8,
    /// Whether the sender masked it (clients must).
    pub masked: bool,
    /// The payload, unmasked.
    pub payload: Vec<u8>,
}

/// Encodes one frame; `mask` is required from clients and absent from servers.
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => frame.push(mask_bit | len as u8),
        len @ 126..=0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            frame.extend_from_slice(&key);
            frame.extend(
                payload
                    .iter()
                    .enumerate()
                    .map(|(index, byte)| byte ^ key[index % 4]),
            );
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}

/// Decodes one frame from the start of `input`: `Ok(None)` if more bytes are needed, otherwise
/// the frame and how many bytes it used. Frames over `max_payload` are an error.
pub fn decode_frame(input: &[u8], max_payload: usize) -> Result<Option<(Frame, usize)>, String> {
    let [first, second, ..] = *input else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        return Err("reserved bits set without an extension".to_owned());
    }
    let masked = second & 0x80 != 0;
    let (len, mut offset) = match second & 0x7f {
        126 => match input.get(2..4) {
            Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4),
            None => return Ok(None),
        },
        127 => match input.get(2..10) {
            Some(bytes) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(bytes);
                (u64::from_be_bytes(be), 10)
            }
            None => return Ok(None),
        },
        len => (u64::from(len), 2),
    };
    if len > max_payload as u64 {
        return Err(format!("frame of {len} bytes is over the limit"));
    }
    let len = len as usize;
    let mask = if masked {
        let Some(key) = input.get(offset..offset + 4) else {
            return Ok(None);
        };
        offset += 4;
        Some([key[0], key[1], key[2], key[3]])
    } else {
        None
    };
    let Some(payload) = input.get(offset..offset + len) else {
        return Ok(None);
    };
    let payload = match mask {
        Some(key) => payload
            .iter()
            .enumerate()
            .map(|(index, byte)| byte ^ key[index % 4])
            .collect(),
        None => payload.to_vec(),
    };
    Ok(Some((
        Frame {
            fin: first & 0x80 != 0,
            opcode: first & 0x0f,
            masked,
            payload,
        },
        offset + len,
    )))
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    base64(&sha1(format!("{}{GUID}", key.trim()).as_bytes()))
}

/// Answers `GET /ws`: completes the handshake and echoes until the close. Returns the status
/// answered (101, or 400/426 for a bad handshake).
pub(crate) async fn upgrade(
    connection: &mut HttpConnection,
    request: &Request,
) -> std::io::Result<u16> {
    let upgrade = request
        .header("upgrade")
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    let Some(key) = request.header("sec-websocket-key").filter(|_| upgrade) else {
        let stream = connection.stream();
        return respond(
            stream,
            400,
            "text/plain",
            b"expected a WebSocket upgrade",
            true,
        )
        .await;
    };
    if request.header("sec-websocket-version") != Some("13") {
        let stream = connection.stream();
        stream
            .write_all(
                b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n\
                  Content-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
        return Ok(426);
    }
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    );
    let (stream, buffered) = connection.parts();
    stream.write_all(response.as_bytes()).await?;
    println!("{} {} -> 101 (WebSocket)", request.method, request.target);
    echo(stream, buffered).await?;
    Ok(101)
}

/// Echoes every message until the client closes (or breaks the protocol).
async fn echo(stream: &mut TcpStream, mut buffer: Vec<u8>) -> std::io::Result<()> {
    let mut message: Option<(u8, Vec<u8>)> = None;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let frame = match decode_frame(&buffer, MAX_MESSAGE) {
            Ok(Some((frame, used))) => {
                buffer.drain(..used);
                frame
            }
            Ok(None) => {
                let read = stream.read(&mut chunk).await?;
                if read == 0 {
                    return Ok(());
                }
                buffer.extend_from_slice(&chunk[..read]);
                continue;
            }
            Err(reason) => return close(stream, CLOSE_TOO_BIG, &reason).await,
        };
        if !frame.masked {
            return close(stream, CLOSE_PROTOCOL_ERROR, "client frames must be masked").await;
        }
        match frame.opcode {
            OPCODE_TEXT | OPCODE_BINARY => {
                if message.is_some() {
                    return close(stream, CLOSE_PROTOCOL_ERROR, "new message inside a message")
                        .await;
                }
                if frame.fin {
                    send(stream, frame.opcode, &frame.payload).await?;
                } else {
                    message = Some((frame.opcode, frame.payload));
                }
            }
            OPCODE_CONTINUATION => {
                let Some((_, data)) = message.as_mut() else {
                    return close(stream, CLOSE_PROTOCOL_ERROR, "continuation of nothing").await;
                };
                data.extend_from_slice(&frame.payload);
                if data.len() > MAX_MESSAGE {
                    return close(stream, CLOSE_TOO_BIG, "message too big").await;
                }
                if frame.fin
                    && let Some((opcode, data)) = message.take()
                {
                    send(stream, opcode, &data).await?;
                }
            }
            OPCODE_PING => send(stream, OPCODE_PONG, &frame.payload).await?,
            OPCODE_PONG => {}
            OPCODE_CLOSE => {
                // Echo the status code (RFC 6455 §5.5.1), then close the connection.
                let code = frame.payload.get(..2).unwrap_or(&[]);
                send(stream, OPCODE_CLOSE, code).await?;
                return stream.shutdown().await;
            }
            _ => return close(stream, CLOSE_PROTOCOL_ERROR, "unknown opcode").await,
        }
    }
}

async fn send(stream: &mut TcpStream, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    stream
        .write_all(&encode_frame(true, opcode, payload, None))
        .await
}

async fn close(stream: &mut TcpStream, code: u16, reason: &str) -> std::io::Result<()> {
    println!("WebSocket closed: {code} {reason}");
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(120)]);
    send(stream, OPCODE_CLOSE, &payload).await?;
    stream.shutdown().await
}

/// SHA-1 (FIPS 180-4). Only for the WebSocket handshake, where RFC 6455 requires it.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut state: [u32; 5] = [
        0x6745_2301,
        0xefcd_ab89,
        0x98ba_dcfe,
        0x1032_5476,
        0xc3d2_e1f0,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut words = [0u32; 80];
        for (index, word) in block.chunks_exact(4).enumerate() {
            words[index] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for index in 16..80 {
            words[index] =
                (words[index - 3] ^ words[index - 8] ^ words[index - 14] ^ words[index - 16])
                    .rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = state;
        for (index, word) in words.iter().enumerate() {
            let (f, k) = match index {
                0..=19 => ((b & c) | (!b & d), 0x5a82_7999),
                20..=39 => (b ^ c ^ d, 0x6ed9_eba1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc),
                _ => (b ^ c ^ d, 0xca62_c1d6),
            };
            let next = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*word);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = next;
        }
        for (slot, value) in state.iter_mut().zip([a, b, c, d, e]) {
            *slot = slot.wrapping_add(value);
        }
    }
    let mut digest = [0u8; 20];
    for (out, word) in digest.chunks_exact_mut(4).zip(state) {
        out.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let bytes = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let triple = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        for position in 0..4 {
            if position <= group.len() {
                let index = (triple >> (18 - 6 * position)) & 0x3f;
                out.push(char::from(ALPHABET[index as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha1_test_vectors() {
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        assert_eq!(
            hex(&sha1(&[b'a'; 1000])),
            "291e9a6c66994949b57ba5e650361e98fc36b1ba"
        );
    }

    #[test]
    fn base64_test_vectors() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), output);
        }
    }

    #[test]
    fn rfc6455_accept_key_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_round_trip_at_every_length_form() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let bytes = encode_frame(true, OPCODE_BINARY, &payload, mask);
                let (frame, used) = decode_frame(&bytes, MAX_MESSAGE).unwrap().unwrap();
                assert_eq!(used, bytes.len());
                assert_eq!(frame.payload, payload);
                assert_eq!(frame.masked, mask.is_some());
                let short = decode_frame(&bytes[..bytes.len() - 1], MAX_MESSAGE).unwrap();
                assert!(short.is_none());
            }
        }
    }
}
