//! HTTP/1.1 heads and body framing: the one HTTP parser of horde, on top of [`httparse`].
//!
//! horde speaks just enough HTTP/1.1 to reach a job: the tunnel's [`http_request`], the
//! executor's readiness probe and outputs route, the demo job and the benches. All of them parse
//! with this module:
//! - [`parse_request_head`] / [`parse_response_head`]: a head from the start of a buffer, or
//!   `None` while it is incomplete. Lines end in CRLF (a bare LF is refused), names and values
//!   are UTF-8, at most [`MAX_HEADERS`] headers.
//! - [`content_length`]: the `Content-Length` of a head: digits only, and every copy of the
//!   header must agree.
//! - [`ResponseHead::body_length`] and [`decode_chunked`]: how a response body is framed
//!   (nothing, `Content-Length`, chunked, or until the connection closes), and the chunked
//!   decoder; [`complete_response_len`] tells whether a whole response is in a buffer.
//! - [`BodyDecoder`]: the same framing decoded as the bytes arrive, for streamed responses.
//! - [`parse_complete_response`]: everything a `Connection: close` exchange received, interim
//!   (`1xx`) responses skipped, body de-chunked.
//!
//! [`http_request`]: crate::tunnel::http_request

use bytes::{Buf as _, Bytes, BytesMut};

/// Headers accepted in one head; more is [`HttpError::Head`] (`TooManyHeaders`).
pub const MAX_HEADERS: usize = 64;

/// Why bytes are not an acceptable HTTP/1.1 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The head does not parse (bad request or status line, bad header, unsupported version,
    /// too many headers).
    #[error("malformed HTTP head: {0}")]
    Head(httparse::Error),
    /// A line of the head ends in a bare LF rather than CRLF.
    #[error("malformed HTTP head: a line ends without CR")]
    BareLineFeed,
    /// A header name or value is not UTF-8.
    #[error("header {0:?} is not UTF-8")]
    NotUtf8(String),
    /// `Content-Length` is not a decimal number, or its copies disagree.
    #[error("bad Content-Length: {0}")]
    BadContentLength(String),
    /// A chunked body is malformed.
    #[error("bad chunked body: {0}")]
    Chunked(&'static str),
    /// The body ended before its announced length.
    #[error("body truncated: {got} of {expected} bytes")]
    Truncated {
        /// Bytes announced.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// The input ended inside the head.
    #[error("no end of the HTTP head")]
    IncompleteHead,
}

impl HttpError {
    /// Whether the head names a version other than HTTP/1.0 and HTTP/1.1 (a server answers
    /// `505`).
    pub fn is_unsupported_version(&self) -> bool {
        matches!(self, Self::Head(httparse::Error::Version))
    }
}

impl From<httparse::Error> for HttpError {
    fn from(error: httparse::Error) -> Self {
        Self::Head(error)
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestHead {
    /// `GET`, `POST`, …
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    /// The minor version: `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub minor_version: u8,
    /// Header names and values in order, values trimmed.
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, blank line included: the body starts there.
    pub len: usize,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResponseHead {
    /// The minor version: `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub minor_version: u8,
    /// The status code (three digits).
    pub status: u16,
    /// The reason phrase (may be empty).
    pub reason: String,
    /// Header names and values in order, values trimmed.
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, blank line included: the body starts there.
    pub len: usize,
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body (a `HEAD` answer, `204`, `304`, an interim `1xx`).
    Empty,
    /// Exactly this many bytes (`Content-Length`).
    Exact(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the connection closes.
    UntilClose,
}

/// The first header named `name` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

/// The `Content-Length` of a head, `None` without one. Refuses anything but decimal digits, and
/// copies that disagree (a message two parsers could frame differently).
pub fn content_length(headers: &[(String, String)]) -> Result<Option<usize>, HttpError> {
    let mut length = None;
    for (_, value) in headers
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case("content-length"))
    {
        let parsed = (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
            .then(|| value.parse::<usize>().ok())
            .flatten()
            .ok_or_else(|| HttpError::BadContentLength(format!("{value:?}")))?;
        if length.is_some_and(|known| known != parsed) {
            return Err(HttpError::BadContentLength("conflicting values".to_owned()));
        }
        length = Some(parsed);
    }
    Ok(length)
}

impl RequestHead {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

impl ResponseHead {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// How the body of this response is delimited; `request_was_head` for the answer to a
    /// `HEAD` request. A `101 Switching Protocols` is followed by the new protocol's bytes,
    /// which count as its body until the connection closes.
    pub fn body_length(&self, request_was_head: bool) -> Result<BodyLength, HttpError> {
        if request_was_head
            || self.status == 204
            || self.status == 304
            || ((100..200).contains(&self.status) && self.status != 101)
        {
            return Ok(BodyLength::Empty);
        }
        if self
            .header("transfer-encoding")
            .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"))
        {
            return Ok(BodyLength::Chunked);
        }
        Ok(match content_length(&self.headers)? {
            Some(length) => BodyLength::Exact(length),
            None => BodyLength::UntilClose,
        })
    }
}

/// Refuses a head whose lines end in a bare LF (httparse accepts them; horde's peers never
/// send them, and two parsers could split such a head differently).
fn check_line_ends(head: &[u8]) -> Result<(), HttpError> {
    let bare = head
        .iter()
        .enumerate()
        .any(|(index, byte)| *byte == b'\n' && (index == 0 || head[index - 1] != b'\r'));
    if bare {
        return Err(HttpError::BareLineFeed);
    }
    Ok(())
}

fn owned_headers(headers: &[httparse::Header<'_>]) -> Result<Vec<(String, String)>, HttpError> {
    headers
        .iter()
        .map(|header| {
            let value = std::str::from_utf8(header.value)
                .map_err(|_| HttpError::NotUtf8(header.name.to_owned()))?;
            Ok((header.name.to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// Parses the request head at the start of `input`; `Ok(None)` while it is incomplete.
pub fn parse_request_head(input: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = request.parse(input)? else {
        return Ok(None);
    };
    check_line_ends(&input[..len])?;
    Ok(Some(RequestHead {
        method: request.method.unwrap_or_default().to_owned(),
        target: request.path.unwrap_or_default().to_owned(),
        minor_version: request.version.unwrap_or_default(),
        headers: owned_headers(request.headers)?,
        len,
    }))
}

/// Parses the response head at the start of `input`; `Ok(None)` while it is incomplete.
pub fn parse_response_head(input: &[u8]) -> Result<Option<ResponseHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = response.parse(input)? else {
        return Ok(None);
    };
    check_line_ends(&input[..len])?;
    Ok(Some(ResponseHead {
        minor_version: response.version.unwrap_or_default(),
        status: response.code.unwrap_or_default(),
        reason: response.reason.unwrap_or_default().to_owned(),
        headers: owned_headers(response.headers)?,
        len,
    }))
}

/// Decodes the chunked body at the start of `input` (chunk extensions and trailers are read
/// and dropped). `Ok(None)` while it is incomplete; otherwise the body and the bytes it took,
/// the final blank line included.
pub fn decode_chunked(input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let (size_len, size) = match httparse::parse_chunk_size(&input[at..]) {
            Ok(httparse::Status::Complete(parsed)) => parsed,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::InvalidChunkSize) => return Err(HttpError::Chunked("bad chunk size")),
        };
        at += size_len;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).map_err(|_| HttpError::Chunked("chunk too large"))?;
        let Some(chunk) = input.get(at..).and_then(|rest| rest.get(..size)) else {
            return Ok(None);
        };
        body.extend_from_slice(chunk);
        at += size;
        match (input.get(at), input.get(at + 1)) {
            (Some(b'\r'), Some(b'\n')) => at += 2,
            (None, _) | (Some(b'\r'), None) => return Ok(None),
            _ => return Err(HttpError::Chunked("chunk not followed by CRLF")),
        }
    }
    // Trailer lines, then the blank line.
    loop {
        let rest = &input[at..];
        let Some(line_end) = rest.windows(2).position(|pair| pair == b"\r\n") else {
            return Ok(None);
        };
        at += line_end + 2;
        if line_end == 0 {
            return Ok(Some((body, at)));
        }
    }
}

/// The length of the first whole response in `buffer` (head and body), if it is all there. A
/// response delimited by the connection's end is never whole: it is refused here.
pub fn complete_response_len(buffer: &[u8]) -> Result<Option<usize>, HttpError> {
    let Some(head) = parse_response_head(buffer)? else {
        return Ok(None);
    };
    let body = &buffer[head.len..];
    Ok(match head.body_length(false)? {
        BodyLength::Empty => Some(head.len),
        BodyLength::Exact(length) => (body.len() >= length).then_some(head.len + length),
        BodyLength::Chunked => decode_chunked(body)?.map(|(_, used)| head.len + used),
        BodyLength::UntilClose => {
            return Err(HttpError::BadContentLength(
                "a response without Content-Length or chunked encoding".to_owned(),
            ));
        }
    })
}

/// A whole response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Response {
    /// The final (non-interim) head.
    pub head: ResponseHead,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

/// Parses everything a `Connection: close` exchange received: interim responses (`1xx` but
/// `101`) are skipped, a chunked body is decoded, a `Content-Length` body is cut to its length,
/// and a body without either runs to the end of `input`.
pub fn parse_complete_response(
    mut input: &[u8],
    request_was_head: bool,
) -> Result<Response, HttpError> {
    loop {
        let head = parse_response_head(input)?.ok_or(HttpError::IncompleteHead)?;
        let rest = &input[head.len..];
        let body = match head.body_length(request_was_head)? {
            BodyLength::Empty if (100..200).contains(&head.status) => {
                input = rest;
                continue;
            }
            BodyLength::Empty => Vec::new(),
            BodyLength::Exact(length) => rest
                .get(..length)
                .ok_or(HttpError::Truncated {
                    expected: length,
                    got: rest.len(),
                })?
                .to_vec(),
            BodyLength::Chunked => {
                decode_chunked(rest)?
                    .ok_or(HttpError::Chunked("the body ends inside a chunk"))?
                    .0
            }
            BodyLength::UntilClose => rest.to_vec(),
        };
        return Ok(Response { head, body });
    }
}

/// Longest chunk-size or trailer line a [`BodyDecoder`] waits for: 8 KiB.
const MAX_CHUNK_LINE: usize = 8 * 1024;

/// Decodes a response body as its bytes arrive, without holding more than the input given to
/// it: `Content-Length` bytes, chunked (extensions and trailers read and dropped), or
/// everything until the connection closes. The streaming counterpart of
/// [`parse_complete_response`]'s body handling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyDecoder {
    state: DecoderState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecoderState {
    Exact { remaining: u64, expected: u64 },
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailer,
    UntilClose,
    Done,
}

impl BodyDecoder {
    /// A decoder for a body delimited by `length`.
    pub fn new(length: BodyLength) -> Self {
        let state = match length {
            BodyLength::Empty | BodyLength::Exact(0) => DecoderState::Done,
            BodyLength::Exact(length) => DecoderState::Exact {
                remaining: length as u64,
                expected: length as u64,
            },
            BodyLength::Chunked => DecoderState::ChunkSize,
            BodyLength::UntilClose => DecoderState::UntilClose,
        };
        Self { state }
    }

    /// Whether the body is complete (a body delimited by the connection's end never is).
    pub fn is_done(&self) -> bool {
        self.state == DecoderState::Done
    }

    /// The next piece of body bytes taken from the front of `input`, or `None` when `input`
    /// holds no more of the body (more input needed, or the body is complete: see
    /// [`is_done`](Self::is_done)). Bytes after a complete body stay in `input`.
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Bytes>, HttpError> {
        loop {
            match self.state {
                DecoderState::Done => return Ok(None),
                DecoderState::UntilClose => {
                    return Ok((!input.is_empty()).then(|| input.split().freeze()));
                }
                DecoderState::Exact {
                    remaining,
                    expected,
                } => {
                    let Some(piece) = take_up_to(input, remaining) else {
                        return Ok(None);
                    };
                    let remaining = remaining - piece.len() as u64;
                    self.state = if remaining == 0 {
                        DecoderState::Done
                    } else {
                        DecoderState::Exact {
                            remaining,
                            expected,
                        }
                    };
                    return Ok(Some(piece));
                }
                DecoderState::ChunkData(remaining) => {
                    let Some(piece) = take_up_to(input, remaining) else {
                        return Ok(None);
                    };
                    let remaining = remaining - piece.len() as u64;
                    self.state = if remaining == 0 {
                        DecoderState::ChunkEnd
                    } else {
                        DecoderState::ChunkData(remaining)
                    };
                    return Ok(Some(piece));
                }
                DecoderState::ChunkSize => match httparse::parse_chunk_size(input) {
                    Ok(httparse::Status::Complete((len, size))) => {
                        input.advance(len);
                        self.state = if size == 0 {
                            DecoderState::Trailer
                        } else {
                            DecoderState::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if input.len() > MAX_CHUNK_LINE => {
                        return Err(HttpError::Chunked("chunk-size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(httparse::InvalidChunkSize) => {
                        return Err(HttpError::Chunked("bad chunk size"));
                    }
                },
                DecoderState::ChunkEnd => match input.get(..2) {
                    None if input.first().is_none_or(|byte| *byte == b'\r') => return Ok(None),
                    Some(b"\r\n") => {
                        input.advance(2);
                        self.state = DecoderState::ChunkSize;
                    }
                    _ => return Err(HttpError::Chunked("chunk not followed by CRLF")),
                },
                DecoderState::Trailer => {
                    let Some(line_end) = input.windows(2).position(|pair| pair == b"\r\n") else {
                        if input.len() > MAX_CHUNK_LINE {
                            return Err(HttpError::Chunked("trailer line too long"));
                        }
                        return Ok(None);
                    };
                    input.advance(line_end + 2);
                    if line_end == 0 {
                        self.state = DecoderState::Done;
                    }
                }
            }
        }
    }

    /// Checks the body is whole when the input has ended: a `Content-Length` or chunked body
    /// cut short is an error.
    pub fn finish(&self) -> Result<(), HttpError> {
        match self.state {
            DecoderState::Done | DecoderState::UntilClose => Ok(()),
            DecoderState::Exact {
                remaining,
                expected,
            } => Err(HttpError::Truncated {
                expected: expected as usize,
                got: (expected - remaining) as usize,
            }),
            _ => Err(HttpError::Chunked("the body ends inside a chunk")),
        }
    }
}

/// Up to `limit` bytes from the front of `input`, `None` if it is empty.
fn take_up_to(input: &mut BytesMut, limit: u64) -> Option<Bytes> {
    let take = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .min(input.len());
    (take > 0).then(|| input.split_to(take).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse_incrementally() {
        let input = b"POST /outputs?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length:  3 \r\n\r\nabc";
        let head = parse_request_head(input).unwrap().unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/outputs?x=1");
        assert_eq!(head.minor_version, 1);
        assert_eq!(head.header("content-length"), Some("3"));
        assert_eq!(&input[head.len..], b"abc");
        assert_eq!(content_length(&head.headers), Ok(Some(3)));
        let head_len = head.len;
        for cut in 0..head_len {
            assert_eq!(parse_request_head(&input[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn malformed_heads_are_refused() {
        for input in [
            &b"GET / HTTP/2.0\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n",
        ] {
            assert!(parse_request_head(input).is_err(), "{input:?}");
        }
        for input in [
            &b"HTTP/1.1 abc\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\nX: y\n\n",
        ] {
            assert!(parse_response_head(input).is_err(), "{input:?}");
        }
    }

    #[test]
    fn content_length_is_digits_and_agrees() {
        let headers = |values: &[&str]| -> Vec<(String, String)> {
            values
                .iter()
                .map(|v| ("Content-Length".to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(content_length(&headers(&[])), Ok(None));
        assert_eq!(content_length(&headers(&["7", "7"])), Ok(Some(7)));
        for bad in [&["+7"][..], &["-1"], &["0x10"], &[""], &["7", "8"]] {
            assert!(content_length(&headers(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_content_length_chunked_and_eof_bodies() {
        let response = parse_complete_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            false,
        )
        .unwrap();
        assert_eq!(
            (response.head.status, response.body.as_slice()),
            (200, &b"hello"[..])
        );
        assert_eq!(response.head.headers[1], ("X-A".to_owned(), "b".to_owned()));

        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                        5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nTrailer: x\r\n\r\n";
        assert_eq!(
            parse_complete_response(chunked, false).unwrap().body,
            b"hello!"
        );
        assert_eq!(complete_response_len(chunked), Ok(Some(chunked.len())));
        for cut in 0..chunked.len() {
            assert_eq!(
                complete_response_len(&chunked[..cut]),
                Ok(None),
                "cut {cut}"
            );
        }

        let response =
            parse_complete_response(b"HTTP/1.0 404 Not Found\r\n\r\nall of it", false).unwrap();
        assert_eq!(
            (response.head.status, response.body.as_slice()),
            (404, &b"all of it"[..])
        );

        let interim =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            parse_complete_response(interim, false).unwrap().head.status,
            201
        );

        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert!(parse_complete_response(head, true).unwrap().body.is_empty());
    }

    #[test]
    fn keep_alive_responses_are_framed() {
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 204 No Content\r\n\r\n";
        let first = complete_response_len(two).unwrap().unwrap();
        assert_eq!(&two[first - 2..first], b"ok");
        assert_eq!(
            complete_response_len(&two[first..]),
            Ok(Some(two.len() - first))
        );
        assert_eq!(complete_response_len(&two[..first - 1]), Ok(None));
        assert!(complete_response_len(b"HTTP/1.1 200 OK\r\n\r\nrest").is_err());
    }

    #[test]
    fn malformed_responses_are_errors_not_panics() {
        for input in [
            &b""[..],
            b"garbage",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ] {
            assert!(parse_complete_response(input, false).is_err(), "{input:?}");
        }
    }

    #[test]
    fn the_body_decoder_streams_every_framing_byte_by_byte() {
        let cases: [(BodyLength, &[u8], &[u8]); 4] = [
            (BodyLength::Exact(5), b"he\xffl\x00rest", b"he\xffl\x00"),
            (
                BodyLength::Chunked,
                b"3;x=y\r\nab\xfe\r\n2\r\n\r\n\r\n0\r\nT: v\r\n\r\nrest",
                b"ab\xfe\r\n",
            ),
            (BodyLength::UntilClose, b"all\xff", b"all\xff"),
            (BodyLength::Empty, b"rest", b""),
        ];
        for (length, input, body) in cases {
            let mut decoder = BodyDecoder::new(length);
            let mut buffer = BytesMut::new();
            let mut out = Vec::new();
            for byte in input {
                buffer.extend_from_slice(&[*byte]);
                while let Some(piece) = decoder.decode(&mut buffer).unwrap() {
                    out.extend_from_slice(&piece);
                }
            }
            assert_eq!(out, body, "{length:?}");
            assert!(decoder.finish().is_ok(), "{length:?}");
            if length != BodyLength::UntilClose {
                assert!(decoder.is_done());
                assert_eq!(&buffer[..], b"rest", "{length:?}");
            }
        }
        let mut cut = BodyDecoder::new(BodyLength::Exact(4));
        assert!(
            cut.decode(&mut BytesMut::from(&b"ab"[..]))
                .unwrap()
                .is_some()
        );
        assert!(cut.finish().is_err());
        let mut bad = BodyDecoder::new(BodyLength::Chunked);
        assert!(bad.decode(&mut BytesMut::from(&b"zz\r\n"[..])).is_err());
        let mut bad = BodyDecoder::new(BodyLength::Chunked);
        assert!(
            bad.decode(&mut BytesMut::from(&b"1\r\naXY"[..]))
                .map(|_| ())
                .and_then(|()| bad.decode(&mut BytesMut::from(&b"XY"[..])).map(|_| ()))
                .is_err()
        );
    }
}
