//! The demo job (`horde-demo-job`): a small HTTP/1.1 server on tokio, written by hand so it has no
//! dependencies, serving what the streaming job flow exercises.
//!
//! Routes (on `127.0.0.1:$HORDE_JOB_PORT`, or `$HORDE_JOB_HOST:$HORDE_JOB_PORT` when set: a bench
//! reaching the job across a veth pair):
//! - `GET /health` → 200 `ok` (503 with `--fail-health`);
//! - `POST /echo` → 200 with the request body (reversed with `--wrong-echo`, a cheating job);
//! - `GET /stream?n=N[&delay_ms=D]` → a chunked `text/event-stream` of N events
//!   `data: token-i`, D ms apart (default 10), then `data: [DONE]`;
//! - `GET /ws` → a WebSocket (RFC 6455) echoing every text and binary message, answering pings;
//! - `GET /volume?path=P` → the file `$HORDE_VOLUME_DIR/P` (404 if absent, 400 for unsafe paths);
//! - `POST /output?path=P` → writes the body to `$HORDE_OUTPUT_DIR/P`, then tells the executor
//!   (`POST $HORDE_EXECUTOR_URL/outputs` with `{"paths":["P"]}`) and answers 200 with
//!   `{"path":P,"executor_status":S}`;
//! - `GET /exit?code=C` → answers 200, then exits with code C;
//! - `GET /bytes?n=N` → 200 with N bytes of `application/octet-stream` (byte i is `i % 251`),
//!   for throughput measurements through the tunnel (N ≤ 64 GiB; 400 otherwise).
//!
//! Connections are kept alive unless the request says `Connection: close` (or is HTTP/1.0).
//! Request bodies need a `Content-Length`. One line per request goes to stdout.
//!
//! Layout: this file (configuration, server, routes), `demo_job/http.rs` (request parsing and
//! responses), `demo_job/websocket.rs` (handshake, frames, echo loop — its frame functions serve
//! test clients too).

pub mod http;
pub mod websocket;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

use self::http::{HttpConnection, ReadError, Request, respond};

/// Most SSE events one `/stream` request may ask for.
const MAX_STREAM_EVENTS: u64 = 100_000;

/// Most bytes one `/bytes` request may ask for: far beyond any benchmark run, and a bound.
const MAX_BYTES_RESPONSE: u64 = 64 << 30;

/// The size of each write of a `/bytes` body.
const BYTES_WRITE: usize = 256 * 1024;

/// Longest delay between SSE events one `/stream` request may ask for.
const MAX_STREAM_DELAY: Duration = Duration::from_secs(1);

/// How long telling the executor about outputs may take.
const EXECUTOR_TIMEOUT: Duration = Duration::from_secs(10);

/// What the demo job is told by its environment and flags.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The port to listen on.
    pub port: u16,
    /// The address to listen on (`HORDE_JOB_HOST`; default 127.0.0.1).
    pub host: IpAddr,
    /// Where the executor put the job's volumes.
    pub volume_dir: Option<PathBuf>,
    /// Where the job writes its outputs.
    pub output_dir: Option<PathBuf>,
    /// The executor's local HTTP address (`http://127.0.0.1:PORT`).
    pub executor_url: Option<String>,
    /// Never answer `/health` with 2xx.
    pub fail_health: bool,
    /// Answer `/echo` wrongly (the body reversed): a cheating job for cross-validation tests.
    pub wrong_echo: bool,
}

impl DemoConfig {
    /// Reads `HORDE_JOB_PORT` (required), `HORDE_JOB_HOST`, `HORDE_VOLUME_DIR`, `HORDE_OUTPUT_DIR` and
    /// `HORDE_EXECUTOR_URL`, and the flags (`--fail-health`).
    pub fn from_env(args: impl IntoIterator<Item = String>) -> anyhow::Result<Self> {
        let port = std::env::var("HORDE_JOB_PORT").context("HORDE_JOB_PORT is not set")?;
        let port = port
            .trim()
            .parse()
            .with_context(|| format!("HORDE_JOB_PORT {port:?} is not a port"))?;
        let host = match std::env::var("HORDE_JOB_HOST") {
            Ok(host) => host
                .trim()
                .parse()
                .with_context(|| format!("HORDE_JOB_HOST {host:?} is not an IP address"))?,
            Err(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let mut fail_health = false;
        let mut wrong_echo = false;
        for arg in args {
            match arg.as_str() {
                "--fail-health" => fail_health = true,
                "--wrong-echo" => wrong_echo = true,
                other => bail!("unknown argument {other:?} (known: --fail-health, --wrong-echo)"),
            }
        }
        let dir = |name: &str| std::env::var_os(name).map(PathBuf::from);
        Ok(Self {
            port,
            host,
            volume_dir: dir("HORDE_VOLUME_DIR"),
            output_dir: dir("HORDE_OUTPUT_DIR"),
            executor_url: std::env::var("HORDE_EXECUTOR_URL").ok(),
            fail_health,
            wrong_echo,
        })
    }
}

/// Listens on `host:port` and serves until the process is killed (or `/exit`).
pub async fn run(config: DemoConfig) -> anyhow::Result<()> {
    let addr = SocketAddr::from((config.host, config.port));
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!(
        "horde-demo-job listening on {addr} (volume dir {:?}, output dir {:?}, executor {:?}{})",
        config.volume_dir,
        config.output_dir,
        config.executor_url,
        if config.fail_health {
            ", failing /health"
        } else {
            ""
        }
    );
    let config = Arc::new(config);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("horde-demo-job: accept: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let config = Arc::clone(&config);
        tokio::spawn(async move {
            if let Err(error) = serve_connection(stream, &config).await {
                eprintln!("horde-demo-job: connection from {peer}: {error}");
            }
        });
    }
}

/// What happens to a connection after a response.
enum After {
    /// Read the next request.
    KeepAlive,
    /// Close the connection (asked for, or the protocol changed).
    Close,
}

async fn serve_connection(stream: TcpStream, config: &DemoConfig) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut connection = HttpConnection::new(stream);
    loop {
        let request = match connection.read_request().await {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(()),
            Err(ReadError::Io(error)) => return Err(error),
            Err(ReadError::Bad { status, reason }) => {
                println!("bad request -> {status} ({reason})");
                respond(
                    connection.stream(),
                    status,
                    "text/plain",
                    reason.as_bytes(),
                    true,
                )
                .await?;
                return connection.stream().shutdown().await;
            }
        };
        let close = request.wants_close();
        let (status, after) = route(&mut connection, &request, config, close).await?;
        println!("{} {} -> {status}", request.method, request.target);
        match after {
            After::KeepAlive if !close => {}
            _ => return connection.stream().shutdown().await,
        }
    }
}

async fn route(
    connection: &mut HttpConnection,
    request: &Request,
    config: &DemoConfig,
    close: bool,
) -> std::io::Result<(u16, After)> {
    let stream = connection.stream();
    let text = "text/plain";
    let status = match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/health") if config.fail_health => {
            respond(stream, 503, text, b"unhealthy (--fail-health)", close).await?
        }
        ("GET", "/health") => respond(stream, 200, text, b"ok", close).await?,
        ("POST", "/echo") if config.wrong_echo => {
            let reversed: Vec<u8> = request.body.iter().rev().copied().collect();
            respond(stream, 200, "application/octet-stream", &reversed, close).await?
        }
        ("POST", "/echo") => {
            respond(
                stream,
                200,
                "application/octet-stream",
                &request.body,
                close,
            )
            .await?
        }
        ("GET", "/stream") => stream_tokens(stream, request, close).await?,
        ("GET", "/bytes") => bytes(stream, request, close).await?,
        ("GET", "/ws") => {
            let status = websocket::upgrade(connection, request).await?;
            return Ok((status, After::Close));
        }
        ("GET", "/volume") => volume(stream, request, config, close).await?,
        ("POST", "/output") => output(stream, request, config, close).await?,
        ("GET", "/exit") => {
            let code: i32 = request
                .query("code")
                .and_then(|code| code.parse().ok())
                .unwrap_or(0);
            respond(
                stream,
                200,
                text,
                format!("exiting with {code}").as_bytes(),
                true,
            )
            .await?;
            let _ = stream.shutdown().await;
            println!(
                "{} {} -> 200; exiting with code {code}",
                request.method, request.target
            );
            std::process::exit(code);
        }
        (
            _,
            "/health" | "/echo" | "/stream" | "/bytes" | "/ws" | "/volume" | "/output" | "/exit",
        ) => respond(stream, 405, text, b"method not allowed", close).await?,
        _ => respond(stream, 404, text, b"no such route", close).await?,
    };
    Ok((status, After::KeepAlive))
}

/// `GET /stream?n=N&delay_ms=D`: N server-sent events, chunked, then `[DONE]`.
async fn stream_tokens(
    stream: &mut TcpStream,
    request: &Request,
    close: bool,
) -> std::io::Result<u16> {
    let count = request
        .query("n")
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(10)
        .min(MAX_STREAM_EVENTS);
    let delay = request
        .query("delay_ms")
        .and_then(|d| d.parse().ok())
        .map_or(Duration::from_millis(10), Duration::from_millis)
        .min(MAX_STREAM_DELAY);
    let mut head =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                    Transfer-Encoding: chunked\r\n"
            .to_owned();
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    for index in 0..count {
        if index > 0 {
            tokio::time::sleep(delay).await;
        }
        http::write_chunk(stream, format!("data: token-{index}\n\n").as_bytes()).await?;
    }
    http::write_chunk(stream, b"data: [DONE]\n\n").await?;
    stream.write_all(b"0\r\n\r\n").await?;
    Ok(200)
}

/// `GET /bytes?n=N`: N bytes, byte i being `i % 251` (a period that no write size divides, so a
/// shifted or repeated piece shows).
async fn bytes(stream: &mut TcpStream, request: &Request, close: bool) -> std::io::Result<u16> {
    let Some(total) = request
        .query("n")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|&n| n <= MAX_BYTES_RESPONSE)
    else {
        let reason = format!("n must be a byte count up to {MAX_BYTES_RESPONSE}");
        return respond(stream, 400, "text/plain", reason.as_bytes(), close).await;
    };
    let mut head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {total}\r\n"
    );
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    // BYTES_WRITE + 251 bytes of the pattern: every write starts at some phase of it.
    let pattern: Vec<u8> = (0..BYTES_WRITE + 251).map(|i| (i % 251) as u8).collect();
    let mut sent = 0u64;
    while sent < total {
        let phase = (sent % 251) as usize;
        let len = (total - sent).min(BYTES_WRITE as u64) as usize;
        stream.write_all(&pattern[phase..phase + len]).await?;
        sent += len as u64;
    }
    Ok(200)
}

/// `dir/relative` if `relative` is a plain relative path (no `..`, no root, no `.`).
fn resolve(dir: &Path, relative: &str) -> Option<PathBuf> {
    let path = Path::new(relative);
    let plain = !relative.is_empty()
        && !relative.contains('\\')
        && path
            .components()
            .all(|component| matches!(component, Component::Normal(_)));
    plain.then(|| dir.join(path))
}

/// `GET /volume?path=P`: a file from the volume directory.
async fn volume(
    stream: &mut TcpStream,
    request: &Request,
    config: &DemoConfig,
    close: bool,
) -> std::io::Result<u16> {
    let text = "text/plain";
    let Some(dir) = &config.volume_dir else {
        return respond(stream, 500, text, b"HORDE_VOLUME_DIR is not set", close).await;
    };
    let Some(path) = request.query("path").and_then(|path| resolve(dir, path)) else {
        return respond(
            stream,
            400,
            text,
            b"path must be relative, without ..",
            close,
        )
        .await;
    };
    match tokio::fs::read(&path).await {
        Ok(contents) => respond(stream, 200, "application/octet-stream", &contents, close).await,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            respond(stream, 404, text, b"no such volume file", close).await
        }
        Err(error) => respond(stream, 500, text, error.to_string().as_bytes(), close).await,
    }
}

/// `POST /output?path=P`: writes the body to the output directory and tells the executor.
async fn output(
    stream: &mut TcpStream,
    request: &Request,
    config: &DemoConfig,
    close: bool,
) -> std::io::Result<u16> {
    let text = "text/plain";
    let Some(dir) = &config.output_dir else {
        return respond(stream, 500, text, b"HORDE_OUTPUT_DIR is not set", close).await;
    };
    let Some(relative) = request.query("path") else {
        return respond(stream, 400, text, b"path is required", close).await;
    };
    let Some(path) = resolve(dir, relative) else {
        return respond(
            stream,
            400,
            text,
            b"path must be relative, without ..",
            close,
        )
        .await;
    };
    let written = async {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::write(&path, &request.body).await
    };
    if let Err(error) = written.await {
        let message = format!("writing {}: {error}", path.display());
        return respond(stream, 500, text, message.as_bytes(), close).await;
    }
    let Some(url) = &config.executor_url else {
        return respond(stream, 502, text, b"HORDE_EXECUTOR_URL is not set", close).await;
    };
    let paths = [relative.to_owned()];
    let notified = tokio::time::timeout(EXECUTOR_TIMEOUT, http::notify_outputs(url, &paths)).await;
    match notified {
        Ok(Ok(executor_status)) => {
            let answer =
                serde_json::json!({ "path": relative, "executor_status": executor_status });
            respond(
                stream,
                200,
                "application/json",
                answer.to_string().as_bytes(),
                close,
            )
            .await
        }
        Ok(Err(error)) => {
            let message = format!("telling the executor at {url}: {error}");
            respond(stream, 502, text, message.as_bytes(), close).await
        }
        Err(_) => {
            respond(
                stream,
                504,
                text,
                b"the executor did not answer in time",
                close,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_resolve() {
        let dir = Path::new("/data");
        assert_eq!(
            resolve(dir, "a/b.txt"),
            Some(PathBuf::from("/data/a/b.txt"))
        );
        for bad in ["", "..", "../x", "a/../../x", "/etc/passwd", "./a", "a\\b"] {
            assert_eq!(resolve(dir, bad), None, "{bad:?}");
        }
    }
}
