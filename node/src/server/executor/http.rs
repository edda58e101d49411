//! The executor's two tiny HTTP/1.1 needs, on loopback only: probing the job's readiness route,
//! and receiving the job's "outputs ready" notifications (`POST /outputs`).

use std::time::Duration;

use horde_protocol::ReadinessProbe;
use horde_transport::http;
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::server::executor::runner::JobDialer;
use crate::server::executor::volumes::VolumeError;

/// Longest head (status or request line + headers) the probe and the outputs listener read.
const MAX_HEAD: usize = 16 * 1024;
/// Largest `POST /outputs` body: a list of relative paths.
const MAX_OUTPUTS_BODY: usize = 64 * 1024;
/// Each probe attempt's own time limit.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One readiness probe through the job's dialer: `true` when the job answers as the probe
/// requires.
pub(crate) async fn probe(dialer: &dyn JobDialer, readiness: &ReadinessProbe) -> bool {
    tokio::time::timeout(PROBE_TIMEOUT, probe_once(dialer, readiness))
        .await
        .unwrap_or(false)
}

async fn probe_once(dialer: &dyn JobDialer, readiness: &ReadinessProbe) -> bool {
    let Ok(mut stream) = dialer.connect().await else {
        return false;
    };
    let target = stream
        .peer_addr()
        .map_or_else(|_| "127.0.0.1".to_owned(), |addr| addr.to_string());
    let request = match readiness {
        ReadinessProbe::Tcp => return true,
        ReadinessProbe::Http { path } => {
            format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
        }
        ReadinessProbe::WebSocket { path } => format!(
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: aG9yZGUtcmVhZGluZXNzMQ==\r\n\r\n"
        ),
        _ => return false,
    };
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let code = match read_head(&mut stream, http::parse_response_head).await {
        Ok(Some((head, _))) => Some(head.status),
        _ => None,
    };
    match (readiness, code) {
        (ReadinessProbe::WebSocket { .. }, Some(101)) => true,
        (ReadinessProbe::Http { .. }, Some(code)) => (200..300).contains(&code),
        _ => false,
    }
}

/// Reads from `stream` until `parse` finds a whole head within [`MAX_HEAD`] bytes; returns it
/// with every byte read (the head's first). `None` for a malformed or overlong head, or an EOF
/// before its end.
async fn read_head<T>(
    stream: &mut TcpStream,
    parse: fn(&[u8]) -> Result<Option<T>, http::HttpError>,
) -> std::io::Result<Option<(T, Vec<u8>)>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match parse(&buffer) {
            Ok(Some(head)) => return Ok(Some((head, buffer))),
            Ok(None) if buffer.len() <= MAX_HEAD => {}
            _ => return Ok(None),
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// A job's notification that files in its output directory are ready.
#[derive(Debug)]
pub(crate) struct OutputsReady {
    /// Paths relative to the output directory.
    pub(crate) paths: Vec<String>,
    /// Where the executor answers once the uploads are done: how many were uploaded, or why
    /// not.
    pub(crate) reply: oneshot::Sender<Result<usize, OutputsRefusal>>,
}

/// Why a job's `POST /outputs` was not done, and the HTTP status that says whose fault it was.
#[derive(Debug)]
pub(crate) struct OutputsRefusal {
    /// 4xx for the job's own mistakes, 5xx for the executor's or the target's.
    pub(crate) status: u16,
    /// Why, for the job to log.
    pub(crate) reason: String,
}

impl OutputsRefusal {
    /// The answer to a `POST /outputs` whose upload failed with `error`: 4xx for what the job
    /// got wrong (a refused path, a missing or irregular file, a file changed while it was
    /// sent: 400; over its budget: 413), 502 for a target that failed, 500 for the executor's
    /// own I/O.
    pub(crate) fn upload_failed(error: &VolumeError) -> Self {
        let status = match error {
            VolumeError::Path { .. }
            | VolumeError::Output { .. }
            | VolumeError::Unsupported(_)
            | VolumeError::SizeMismatch { .. }
            | VolumeError::HashMismatch { .. } => 400,
            VolumeError::OverBudget { .. } => 413,
            VolumeError::Blob { .. }
            | VolumeError::HttpStatus { .. }
            | VolumeError::Http { .. } => 502,
            VolumeError::Io { .. } => 500,
        };
        Self {
            status,
            reason: error.to_string(),
        }
    }
}

#[derive(Deserialize)]
struct OutputsBody {
    paths: Vec<String>,
}

/// Answers one `POST /outputs` request from the job, handing the notification to `notify`.
pub(crate) async fn handle_outputs(
    mut stream: TcpStream,
    notify: mpsc::Sender<OutputsReady>,
) -> std::io::Result<()> {
    let Some((head, mut body)) = read_head(&mut stream, http::parse_request_head).await? else {
        return respond(stream, 400, "bad request").await;
    };
    if head.method != "POST" || head.target != "/outputs" {
        return respond(stream, 404, "only POST /outputs").await;
    }
    // An unreadable or conflicting length counts as too large, as before.
    let content_length = http::content_length(&head.headers)
        .unwrap_or(Some(usize::MAX))
        .unwrap_or(0);
    if content_length > MAX_OUTPUTS_BODY {
        return respond(stream, 413, "body too large").await;
    }
    body.drain(..head.len);
    body.truncate(content_length);
    let received = body.len();
    body.resize(content_length, 0);
    stream.read_exact(&mut body[received..]).await?;
    let Ok(parsed) = serde_json::from_slice::<OutputsBody>(&body) else {
        return respond(stream, 400, "expected {\"paths\": [...]}").await;
    };
    let (reply, answer) = oneshot::channel();
    if notify
        .send(OutputsReady {
            paths: parsed.paths,
            reply,
        })
        .await
        .is_err()
    {
        return respond(stream, 503, "job is ending").await;
    }
    match answer.await {
        Ok(Ok(count)) => respond(stream, 200, &format!("uploaded {count}")).await,
        Ok(Err(refused)) => respond(stream, refused.status, &refused.reason).await,
        Err(_) => respond(stream, 503, "job is ending").await,
    }
}

async fn respond(mut stream: TcpStream, code: u16, text: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
