//! Just enough HTTP/1.1 for the demo job: reading requests (head + `Content-Length` body) from a
//! kept-alive connection, writing responses and chunks, and one outgoing POST to the executor.
//! Heads are parsed by [`horde_transport::http`].

use horde_transport::http;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The longest request head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// The largest request body accepted: 128 MiB, so `POST /echo` can answer the 100 MB body of
/// the client's streaming test (the demo job holds the body in memory; the client does not).
const MAX_BODY: usize = 128 * 1024 * 1024;

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    /// The path, percent-decoded.
    pub path: String,
    /// The query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    /// `true` for HTTP/1.0.
    pub http10: bool,
    /// Header names and values.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The first query parameter named `name`.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Whether the connection closes after this request (`Connection: close`, or HTTP/1.0
    /// without `keep-alive`).
    pub fn wants_close(&self) -> bool {
        let connection = self.header("connection").unwrap_or("").to_ascii_lowercase();
        if self.http10 {
            !connection.contains("keep-alive")
        } else {
            connection.split(',').any(|token| token.trim() == "close")
        }
    }
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The connection failed.
    Io(std::io::Error),
    /// The request is malformed or unsupported: answer `status` and close.
    Bad {
        /// The status to answer with.
        status: u16,
        /// Why.
        reason: String,
    },
}

fn bad(status: u16, reason: impl Into<String>) -> ReadError {
    ReadError::Bad {
        status,
        reason: reason.into(),
    }
}

/// A server-side connection with the bytes read past the last request.
#[derive(Debug)]
pub struct HttpConnection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl HttpConnection {
    /// Wraps an accepted connection.
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buffer: Vec::new(),
        }
    }

    /// The socket.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// The socket and the bytes read past the last request (e.g. the first WebSocket frames).
    pub fn parts(&mut self) -> (&mut TcpStream, Vec<u8>) {
        (&mut self.stream, std::mem::take(&mut self.buffer))
    }

    /// Reads more bytes into the buffer; `false` at EOF.
    async fn fill(&mut self) -> Result<bool, ReadError> {
        let mut chunk = [0u8; 16 * 1024];
        let read = self.stream.read(&mut chunk).await.map_err(ReadError::Io)?;
        self.buffer.extend_from_slice(&chunk[..read]);
        Ok(read > 0)
    }

    /// The next request; `None` if the client closed between requests.
    pub async fn read_request(&mut self) -> Result<Option<Request>, ReadError> {
        let head = loop {
            match http::parse_request_head(&self.buffer) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(error) if error.is_unsupported_version() => {
                    return Err(bad(505, "only HTTP/1.0 and HTTP/1.1"));
                }
                Err(error) => return Err(bad(400, error.to_string())),
            }
            if self.buffer.len() > MAX_HEAD {
                return Err(bad(431, "request head too large"));
            }
            if !self.fill().await? {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return Err(bad(400, "connection closed inside a request head"));
            }
        };
        self.buffer.drain(..head.len);
        let (path, query) = split_target(&head.target);
        let length = http::content_length(&head.headers);
        let mut request = Request {
            http10: head.minor_version == 0,
            method: head.method,
            target: head.target,
            path,
            query,
            headers: head.headers,
            body: Vec::new(),
        };
        if request
            .header("transfer-encoding")
            .is_some_and(|value| !value.eq_ignore_ascii_case("identity"))
        {
            return Err(bad(411, "send the body with a Content-Length"));
        }
        let length = length
            .map_err(|_| bad(400, "bad Content-Length"))?
            .unwrap_or(0);
        if length > MAX_BODY {
            return Err(bad(413, "body too large"));
        }
        while self.buffer.len() < length {
            if !self.fill().await? {
                return Err(bad(400, "connection closed inside a request body"));
            }
        }
        request.body = self.buffer.drain(..length).collect();
        Ok(Some(request))
    }
}

fn split_target(target: &str) -> (String, Vec<(String, String)>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect();
    (percent_decode(path), query)
}

/// Decodes `%XX` escapes and `+` (as a space); invalid escapes are kept as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        index += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

/// Writes a whole response with a `Content-Length`; returns `status` for the log line.
pub async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
) -> std::io::Result<u16> {
    let mut response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}\r\n",
        reason(status),
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    response.extend_from_slice(body);
    stream.write_all(&response).await?;
    Ok(status)
}

/// Writes one chunk of a chunked body (never empty: the empty chunk ends the body).
pub async fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    stream.write_all(&chunk).await
}

/// `POST {executor_url}/outputs` with `{"paths": [...]}`; returns the executor's status code.
/// Only `http://host:port[/base]` URLs.
pub async fn notify_outputs(executor_url: &str, paths: &[String]) -> std::io::Result<u16> {
    let invalid =
        |message: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, message.to_owned());
    let rest = executor_url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("HORDE_EXECUTOR_URL must start with http://"))?;
    let (authority, base) = match rest.find('/') {
        Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let body = serde_json::json!({ "paths": paths }).to_string();
    let request = format!(
        "POST {base}/outputs HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(authority).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match http::parse_response_head(&response) {
            Ok(Some(head)) => return Ok(head.status),
            Ok(None) => {}
            Err(_) => return Err(invalid("the executor sent a bad status line")),
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 || response.len() > MAX_HEAD {
            return Err(invalid("the executor sent no status line"));
        }
        response.extend_from_slice(&chunk[..read]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_and_decode() {
        let (path, query) = split_target("/volume?path=a%2Fb%20c.txt&n=3&flag");
        assert_eq!(path, "/volume");
        assert_eq!(
            query,
            vec![
                ("path".to_owned(), "a/b c.txt".to_owned()),
                ("n".to_owned(), "3".to_owned()),
                ("flag".to_owned(), String::new()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("a+b"), "a b");
    }
}
