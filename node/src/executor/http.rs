//! The executor's two tiny HTTP/1.1 needs, on loopback only: probing the job's readiness route,
//! and receiving the job's "outputs ready" notifications (`POST /outputs`).

use std::time::Duration;

use horde_protocol::ReadinessProbe;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::runner::JobDialer;

/// Longest request head (request line + headers) the outputs listener reads.
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
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    if reader.read_line(&mut status_line).await.is_err() {
        return false;
    }
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    match (readiness, code) {
        (ReadinessProbe::WebSocket { .. }, Some(101)) => true,
        (ReadinessProbe::Http { .. }, Some(code)) => (200..300).contains(&code),
        _ => false,
    }
}

/// A job's notification that files in its output directory are ready.
#[derive(Debug)]
pub(crate) struct OutputsReady {
    /// Paths relative to the output directory.
    pub(crate) paths: Vec<String>,
    /// Where the executor answers once the uploads are done (`Err` carries the reason).
    pub(crate) reply: oneshot::Sender<Result<usize, String>>,
}

#[derive(Deserialize)]
struct OutputsBody {
    paths: Vec<String>,
}

/// Answers one `POST /outputs` request from the job, handing the notification to `notify`.
pub(crate) async fn handle_outputs(
    stream: TcpStream,
    notify: mpsc::Sender<OutputsReady>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    let mut content_length = 0usize;
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 || head.len() > MAX_HEAD {
            return respond(reader.into_inner(), 400, "bad request").await;
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(usize::MAX);
        }
        head.push_str(&line);
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "POST" || path != "/outputs" {
        return respond(reader.into_inner(), 404, "only POST /outputs").await;
    }
    if content_length > MAX_OUTPUTS_BODY {
        return respond(reader.into_inner(), 413, "body too large").await;
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).await?;
    let Ok(parsed) = serde_json::from_slice::<OutputsBody>(&body) else {
        return respond(reader.into_inner(), 400, "expected {\"paths\": [...]}").await;
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
        return respond(reader.into_inner(), 503, "job is ending").await;
    }
    match answer.await {
        Ok(Ok(count)) => respond(reader.into_inner(), 200, &format!("uploaded {count}")).await,
        Ok(Err(reason)) => respond(reader.into_inner(), 500, &reason).await,
        Err(_) => respond(reader.into_inner(), 503, "job is ending").await,
    }
}

async fn respond(mut stream: TcpStream, code: u16, text: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
