//! One HTTP/1.1 request through one tunnel stream: [`http_request_streaming`] sends the
//! request (its body from memory or streamed from a reader) and returns the response head with
//! an [`HttpResponseStream`] that yields the body's exact bytes as they arrive and the job's
//! verified receipt at the end; [`http_request`] is the same, buffered.

use bytes::{Bytes, BytesMut};
use horde_protocol::{JobReceipt, Signed};
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::client::{JobTunnel, TunnelStream};
use super::{DATA_CHUNK, MAX_HTTP_RESPONSE, TunnelError};
use crate::http;

/// Longest response head (interim `1xx` heads before it included) a request reads: 64 KiB.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The body of a request sent with [`http_request_streaming`].
#[derive(Debug)]
pub enum RequestBody<'a, R> {
    /// Bytes in memory.
    Bytes(&'a [u8]),
    /// Exactly `len` bytes read from `reader` as they are sent.
    Reader {
        /// The `Content-Length`: the reader must give exactly this many bytes.
        len: u64,
        /// Where the bytes come from.
        reader: R,
    },
}

/// A job's answer to [`http_request`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names and values in order, as sent.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// The job's verified receipt for the stream.
    pub receipt: Signed<JobReceipt>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        http::header(&self.headers, name)
    }
}

/// A job's answer to [`http_request_streaming`]: the head, then the body's exact bytes as they
/// arrive ([`next_body`](Self::next_body)), then the receipt ([`finish`](Self::finish)). Holds
/// at most one tunnel read of the body at a time. The body's bytes are only proven to be the
/// job's once `finish` returns the verified receipt: keep them provisional until then.
#[derive(Debug)]
pub struct HttpResponseStream {
    /// The status code.
    pub status: u16,
    /// Header names and values in order, as sent.
    pub headers: Vec<(String, String)>,
    head: Bytes,
    stream: TunnelStream,
    buffer: BytesMut,
    decoder: http::BodyDecoder,
    /// The stream ended (its receipt verified).
    ended: bool,
}

fn http_error(error: http::HttpError) -> TunnelError {
    TunnelError::Http(error.to_string())
}

impl HttpResponseStream {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        http::header(&self.headers, name)
    }

    /// The final response head exactly as the job sent it (status line, headers, blank line).
    pub fn head_bytes(&self) -> &[u8] {
        &self.head
    }

    /// The next bytes of the body (de-chunked), `None` at its end.
    pub async fn next_body(&mut self) -> Result<Option<Bytes>, TunnelError> {
        loop {
            if let Some(piece) = self.decoder.decode(&mut self.buffer).map_err(http_error)? {
                return Ok(Some(piece));
            }
            if self.decoder.is_done() || self.ended {
                return Ok(None);
            }
            match self.stream.read().await? {
                Some(bytes) if self.buffer.is_empty() => self.buffer = BytesMut::from(bytes),
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => self.ended = true,
            }
        }
    }

    /// Reads the stream to its end (the rest of the body, if not read, and anything after it
    /// are dropped, but counted by the receipt), checks the body was whole and returns the job's
    /// verified receipt.
    pub async fn finish(mut self) -> Result<Signed<JobReceipt>, TunnelError> {
        while self.next_body().await?.is_some() {}
        while !self.ended {
            self.ended = self.stream.read().await?.is_none();
        }
        self.decoder.finish().map_err(http_error)?;
        self.stream
            .receipt()
            .cloned()
            .ok_or(TunnelError::MissingReceipt)
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` through a new tunnel stream and reads
/// the response head: the body follows from the returned [`HttpResponseStream`]. Interim
/// (`1xx` but `101`) responses are skipped; `Content-Length`, chunked and read-to-end bodies
/// are handled. Memory stays bounded whatever the sizes: the request body is sent
/// [`DATA_CHUNK`] at a time, the head is capped at [`MAX_RESPONSE_HEAD`].
pub async fn http_request_streaming<R: AsyncRead + Unpin>(
    tunnel: &JobTunnel,
    method: &str,
    path: &str,
    body: RequestBody<'_, R>,
) -> Result<HttpResponseStream, TunnelError> {
    http_request_streaming_with_headers(tunnel, method, path, &[], body).await
}

/// Headers the request framing sets itself: a caller's would contradict it.
const FRAMING_HEADERS: [&str; 3] = ["content-length", "transfer-encoding", "connection"];

/// [`http_request_streaming`] with the caller's `headers` added. A `Host` or `User-Agent` among
/// them replaces the default one; `Content-Length`, `Transfer-Encoding` and `Connection` are
/// refused (the body's length and the connection's end are set by the request), and so are names
/// that are not HTTP tokens and values holding CR, LF or NUL.
pub async fn http_request_streaming_with_headers<R: AsyncRead + Unpin>(
    tunnel: &JobTunnel,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: RequestBody<'_, R>,
) -> Result<HttpResponseStream, TunnelError> {
    let len = match &body {
        RequestBody::Bytes(bytes) => bytes.len() as u64,
        RequestBody::Reader { len, .. } => *len,
    };
    let mut request = request_head(method, path, headers, len)?;
    let mut stream = tunnel.open().await?;
    match body {
        RequestBody::Bytes(bytes) => {
            request.extend_from_slice(bytes);
            stream.write_last(Bytes::from(request)).await?;
        }
        RequestBody::Reader { len, mut reader } => {
            stream.write_bytes(Bytes::from(request)).await?;
            let mut sent = 0u64;
            let mut buffer = vec![0u8; DATA_CHUNK];
            while sent < len {
                let want =
                    usize::try_from(len - sent).map_or(DATA_CHUNK, |left| left.min(DATA_CHUNK));
                let read = reader
                    .read(&mut buffer[..want])
                    .await
                    .map_err(TunnelError::Local)?;
                if read == 0 {
                    return Err(TunnelError::Http(format!(
                        "the request body ended after {sent} of {len} bytes"
                    )));
                }
                stream.write(&buffer[..read]).await?;
                sent += read as u64;
            }
            stream.finish_sending().await?;
        }
    }
    read_head(stream, method.eq_ignore_ascii_case("HEAD")).await
}

/// The request's head: the request line, `Host` and `User-Agent` unless `headers` give them,
/// the caller's `headers`, `Connection: close` and `Content-Length: len`. Refuses a method or
/// path that is empty or holds spaces or control characters, a header name that is not an HTTP
/// token, a value holding CR, LF or NUL, and the framing headers.
fn request_head(
    method: &str,
    path: &str,
    headers: &[(String, String)],
    len: u64,
) -> Result<Vec<u8>, TunnelError> {
    let token_ok = |text: &str| !text.is_empty() && !text.bytes().any(|b| b <= b' ' || b == 0x7f);
    if !token_ok(method) || !token_ok(path) {
        return Err(TunnelError::Http(
            "method and path must be non-empty with no spaces or control characters".to_owned(),
        ));
    }
    let mut extra = String::new();
    for (name, value) in headers {
        // RFC 9110 token characters only.
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        let name_ok = !name.is_empty() && name.bytes().all(tchar);
        if !name_ok || value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(TunnelError::Http(format!(
                "header {name:?}: not a valid header"
            )));
        }
        if FRAMING_HEADERS.iter().any(|f| name.eq_ignore_ascii_case(f)) {
            return Err(TunnelError::Http(format!(
                "header {name}: set by the request itself, not by the caller"
            )));
        }
        extra.push_str(&format!("{name}: {value}\r\n"));
    }
    let given = |wanted: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(wanted));
    let host = if given("host") {
        ""
    } else {
        "Host: horde-job\r\n"
    };
    let agent = if given("user-agent") {
        ""
    } else {
        "User-Agent: horde\r\n"
    };
    Ok(format!(
        "{method} {path} HTTP/1.1\r\n{host}{agent}{extra}Connection: close\r\n\
         Content-Length: {len}\r\n\r\n",
    )
    .into_bytes())
}

/// Reads the final response head from `stream`.
async fn read_head(
    mut stream: TunnelStream,
    request_was_head: bool,
) -> Result<HttpResponseStream, TunnelError> {
    let mut buffer = BytesMut::new();
    let mut skipped = 0;
    loop {
        if let Some(head) = http::parse_response_head(&buffer).map_err(http_error)? {
            let length = head.body_length(request_was_head).map_err(http_error)?;
            let interim = (100..200).contains(&head.status) && head.status != 101;
            let bytes = buffer.split_to(head.len).freeze();
            if interim {
                skipped += head.len;
                continue;
            }
            return Ok(HttpResponseStream {
                status: head.status,
                headers: head.headers,
                head: bytes,
                stream,
                buffer,
                decoder: http::BodyDecoder::new(length),
                ended: false,
            });
        }
        if skipped + buffer.len() > MAX_RESPONSE_HEAD {
            return Err(TunnelError::Http(format!(
                "response head longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        match stream.read().await? {
            Some(bytes) => buffer.extend_from_slice(&bytes),
            None => return Err(http_error(http::HttpError::IncompleteHead)),
        }
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` through one tunnel stream, reads the
/// response to the end (at most [`MAX_HTTP_RESPONSE`] bytes of body) and verifies the job's
/// receipt: [`http_request_streaming`], buffered.
pub async fn http_request(
    tunnel: &JobTunnel,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<HttpResponse, TunnelError> {
    let mut response =
        http_request_streaming(tunnel, method, path, RequestBody::<&[u8]>::Bytes(body)).await?;
    let mut collected = Vec::new();
    while let Some(piece) = response.next_body().await? {
        if collected.len() + piece.len() > MAX_HTTP_RESPONSE {
            return Err(TunnelError::Http(format!(
                "response larger than {MAX_HTTP_RESPONSE} bytes"
            )));
        }
        collected.extend_from_slice(&piece);
    }
    let (status, headers) = (response.status, std::mem::take(&mut response.headers));
    let receipt = response.finish().await?;
    Ok(HttpResponse {
        status,
        headers,
        body: collected,
        receipt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn refusal(method: &str, path: &str, pairs: &[(&str, &str)]) -> String {
        match request_head(method, path, &headers(pairs), 0) {
            Err(TunnelError::Http(reason)) => reason,
            other => panic!("{method} {path} {pairs:?}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_request_head_carries_the_callers_headers_and_its_own_framing() {
        let given = headers(&[("X-Trace", "a b\tc"), ("host", "job.example")]);
        let head = request_head("POST", "/echo?x=1", &given, 42).unwrap();
        let parsed = http::parse_request_head(&head)
            .unwrap()
            .expect("a whole head");
        assert_eq!(parsed.len, head.len());
        assert_eq!(
            (parsed.method.as_str(), parsed.target.as_str()),
            ("POST", "/echo?x=1")
        );
        assert_eq!(parsed.header("x-trace"), Some("a b\tc"));
        // The caller's Host replaces the default one; the default User-Agent stays.
        assert_eq!(parsed.header("Host"), Some("job.example"));
        let hosts = parsed
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("host"));
        assert_eq!(hosts.count(), 1);
        assert_eq!(parsed.header("User-Agent"), Some("horde"));
        assert_eq!(parsed.header("Connection"), Some("close"));
        assert_eq!(http::content_length(&parsed.headers).unwrap(), Some(42));
    }

    #[test]
    fn headers_that_would_break_the_framing_are_refused() {
        for name in ["Content-Length", "transfer-encoding", "CONNECTION"] {
            let reason = refusal("GET", "/", &[(name, "1")]);
            assert!(
                reason.contains("set by the request itself"),
                "{name}: {reason}"
            );
        }
        // A value that would smuggle a second header or request.
        for value in ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\0b"] {
            let reason = refusal("GET", "/", &[("X-Ok", value)]);
            assert!(reason.contains("not a valid header"), "{value:?}: {reason}");
        }
        // Names that are not HTTP tokens.
        for name in ["", "X Y", "X:Y", "X\tY", "(x)", "a/b", "x\u{7f}", "é"] {
            let reason = refusal("GET", "/", &[(name, "v")]);
            assert!(reason.contains("not a valid header"), "{name:?}: {reason}");
        }
        for (method, path) in [
            ("", "/"),
            ("GE T", "/"),
            ("GET", ""),
            ("GET", "/a b"),
            ("GET", "/\r\n"),
        ] {
            let reason = refusal(method, path, &[]);
            assert!(
                reason.contains("method and path"),
                "{method:?} {path:?}: {reason}"
            );
        }
    }
}
