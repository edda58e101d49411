//! The demo job binary, started for real on a free port with temporary directories and a stub
//! executor, checked route by route over plain TCP.

// Helpers outside `#[test]` functions are not covered by clippy's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const VOLUME_FILE: &str = "inputs/data.txt";
const VOLUME_CONTENTS: &str = "volume contents\n";

struct DemoJob {
    child: tokio::process::Child,
    port: u16,
    output_dir: PathBuf,
    stdout: mpsc::Receiver<String>,
    _volume: tempfile::TempDir,
    _output: tempfile::TempDir,
}

impl DemoJob {
    async fn start(args: &[&str], executor_url: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let volume = tempfile::tempdir().unwrap();
        let output = tempfile::tempdir().unwrap();
        let file = volume.path().join(VOLUME_FILE);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, VOLUME_CONTENTS).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_horde-demo-job"))
            .args(args)
            .env("HORDE_JOB_PORT", port.to_string())
            .env("HORDE_VOLUME_DIR", volume.path())
            .env("HORDE_OUTPUT_DIR", output.path())
            .env("HORDE_EXECUTOR_URL", executor_url)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (sender, mut stdout) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if sender.send(line).await.is_err() {
                    break;
                }
            }
        });
        let first = tokio::time::timeout(Duration::from_secs(10), stdout.recv())
            .await
            .expect("the demo job logs its start")
            .unwrap();
        assert!(first.contains("listening on 127.0.0.1"), "{first}");
        Self {
            child,
            port,
            output_dir: output.path().to_path_buf(),
            stdout,
            _volume: volume,
            _output: output,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port)).await.unwrap()
    }

    /// One request with `Connection: close`, read to the end.
    async fn request(&self, method: &str, target: &str, body: &[u8]) -> Response {
        let mut tcp = self.connect().await;
        let mut request = format!(
            "{method} {target} HTTP/1.1\r\nHost: job\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        tcp.write_all(&request).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
            .await
            .unwrap()
            .unwrap();
        parse(&raw)
    }

    /// Waits (up to 5 s) until stdout has logged a line containing each of `needles`.
    async fn wait_logged(&mut self, needles: &[&str]) {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !needles
            .iter()
            .all(|n| seen.iter().any(|l: &String| l.contains(n)))
        {
            match tokio::time::timeout_at(deadline, self.stdout.recv()).await {
                Ok(Some(line)) => seen.push(line),
                _ => panic!("expected {needles:?} in the log, got {seen:#?}"),
            }
        }
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses one whole response (chunked or `Content-Length`).
fn parse(raw: &[u8]) -> Response {
    let end = find(raw, b"\r\n\r\n").expect("a response head");
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let mut rest = &raw[end + 4..];
    if response.header("transfer-encoding") == Some("chunked") {
        loop {
            let line_end = find(rest, b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            response.body.extend_from_slice(&rest[..size]);
            assert_eq!(&rest[size..size + 2], b"\r\n");
            rest = &rest[size + 2..];
        }
    } else {
        let length: usize = response.header("content-length").unwrap().parse().unwrap();
        response.body = rest[..length].to_vec();
    }
    response
}

/// A stub executor: records each POST (head, body) and answers 202.
async fn executor_stub() -> (String, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut raw = Vec::new();
            let mut chunk = [0u8; 4096];
            let end = loop {
                if let Some(end) = find(&raw, b"\r\n\r\n") {
                    break end;
                }
                let read = tcp.read(&mut chunk).await.unwrap();
                assert!(read > 0);
                raw.extend_from_slice(&chunk[..read]);
            };
            let head = String::from_utf8(raw[..end].to_vec()).unwrap();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while raw.len() < end + 4 + length {
                let read = tcp.read(&mut chunk).await.unwrap();
                assert!(read > 0);
                raw.extend_from_slice(&chunk[..read]);
            }
            let body = raw[end + 4..end + 4 + length].to_vec();
            tcp.write_all(
                b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            let _ = sender.send((head, body)).await;
        }
    });
    (url, receiver)
}

#[tokio::test]
async fn health_echo_keep_alive_and_logs() {
    let mut job = DemoJob::start(&[], "http://127.0.0.1:9").await;
    let response = job.request("GET", "/health", b"").await;
    assert_eq!((response.status, response.text().as_str()), (200, "ok"));
    let response = job.request("POST", "/echo", b"echo me").await;
    assert_eq!(
        (response.status, response.body.as_slice()),
        (200, &b"echo me"[..])
    );
    assert_eq!(job.request("GET", "/nowhere", b"").await.status, 404);
    assert_eq!(job.request("POST", "/health", b"").await.status, 405);

    // Two requests on one kept-alive connection; the second closes it.
    let mut tcp = job.connect().await;
    tcp.write_all(
        b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\none\
          POST /echo HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\ntwo",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let first = parse(&raw);
    assert_eq!(first.body, b"one");
    let second_start = find(&raw[4..], b"HTTP/1.1").unwrap() + 4;
    let second = parse(&raw[second_start..]);
    assert_eq!(second.body, b"two");
    assert_eq!(second.header("connection"), Some("close"));

    job.wait_logged(&[
        "GET /health -> 200",
        "POST /echo -> 200",
        "GET /nowhere -> 404",
    ])
    .await;
}

#[tokio::test]
async fn stream_sends_n_sse_tokens_then_done() {
    let job = DemoJob::start(&[], "http://127.0.0.1:9").await;
    let started = Instant::now();
    let response = job.request("GET", "/stream?n=7&delay_ms=10", b"").await;
    assert!(started.elapsed() >= Duration::from_millis(60));
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    let text = response.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let expected: Vec<String> = (0..7)
        .map(|i| format!("data: token-{i}"))
        .chain(["data: [DONE]".to_owned()])
        .collect();
    assert_eq!(events, expected);
}

#[tokio::test]
async fn bytes_sends_exactly_n_bytes_of_the_pattern() {
    let job = DemoJob::start(&[], "http://127.0.0.1:9").await;
    // More than one write (256 KiB) and not a multiple of the pattern's period.
    let n = 600_001usize;
    let response = job.request("GET", &format!("/bytes?n={n}"), b"").await;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(response.header("content-length"), Some("600001"));
    let expected: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    assert!(response.body == expected, "the body is not the pattern");
    let empty = job.request("GET", "/bytes?n=0", b"").await;
    assert_eq!((empty.status, empty.body.len()), (200, 0));
    for bad in [
        "/bytes",
        "/bytes?n=-1",
        "/bytes?n=x",
        "/bytes?n=68719476737",
    ] {
        let response = job.request("GET", bad, b"").await;
        assert_eq!(response.status, 400, "{bad}");
        assert!(response.text().contains("up to 68719476736"), "{bad}");
    }
    let response = job.request("POST", "/bytes?n=1", b"").await;
    assert_eq!(response.status, 405);
}

/// A client frame, masked, written by hand (payloads under 126 bytes).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads one unmasked server frame (payloads under 126 bytes): (fin, opcode, payload).
async fn server_frame(tcp: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await.unwrap();
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = usize::from(head[1] & 0x7f);
    assert!(len < 126);
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.unwrap();
    (head[0] & 0x80 != 0, head[0] & 0x0f, payload)
}

#[tokio::test]
async fn websocket_echo_round_trip() {
    let job = DemoJob::start(&[], "http://127.0.0.1:9").await;
    let mut tcp = job.connect().await;
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: job\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while find(&head, b"\r\n\r\n").is_none() {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );

    tcp.write_all(&client_frame(0x1, b"hello websocket"))
        .await
        .unwrap();
    assert_eq!(
        server_frame(&mut tcp).await,
        (true, 0x1, b"hello websocket".to_vec())
    );
    tcp.write_all(&client_frame(0x2, &[0, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        server_frame(&mut tcp).await,
        (true, 0x2, vec![0, 1, 2, 255])
    );
    tcp.write_all(&client_frame(0x9, b"are you there"))
        .await
        .unwrap();
    assert_eq!(
        server_frame(&mut tcp).await,
        (true, 0xA, b"are you there".to_vec())
    );
    // A message in two fragments comes back whole.
    let mut first = client_frame(0x1, b"frag");
    first[0] &= 0x7f;
    tcp.write_all(&first).await.unwrap();
    tcp.write_all(&client_frame(0x0, b"mented")).await.unwrap();
    assert_eq!(
        server_frame(&mut tcp).await,
        (true, 0x1, b"fragmented".to_vec())
    );

    tcp.write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(
        server_frame(&mut tcp).await,
        (true, 0x8, 1000u16.to_be_bytes().to_vec())
    );
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "the server closes after the close frame");
}

#[tokio::test]
async fn websocket_refuses_unmasked_client_frames() {
    let job = DemoJob::start(&[], "http://127.0.0.1:9").await;
    let mut tcp = job.connect().await;
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tcp.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    tcp.read_to_end(&mut raw).await.unwrap();
    let frame_start = find(&raw, b"\r\n\r\n").unwrap() + 4;
    let frame = &raw[frame_start..];
    assert_eq!(frame[0], 0x88, "a close frame");
    assert_eq!(&frame[2..4], &1002u16.to_be_bytes());
}

#[tokio::test]
async fn volume_files_are_served_and_paths_checked() {
    let job = DemoJob::start(&[], "http://127.0.0.1:9").await;
    let response = job
        .request("GET", &format!("/volume?path={VOLUME_FILE}"), b"")
        .await;
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, VOLUME_CONTENTS)
    );
    let response = job
        .request("GET", "/volume?path=inputs%2Fdata.txt", b"")
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(
        job.request("GET", "/volume?path=missing.txt", b"")
            .await
            .status,
        404
    );
    for bad in ["../outside-secret", "%2Fetc%2Fpasswd", "inputs/../../x", ""] {
        let response = job
            .request("GET", &format!("/volume?path={bad}"), b"")
            .await;
        assert_eq!(response.status, 400, "{bad}");
    }
}

#[tokio::test]
async fn output_is_written_and_the_executor_told() {
    let (url, mut posts) = executor_stub().await;
    let job = DemoJob::start(&[], &url).await;
    let response = job
        .request("POST", "/output?path=results/out.txt", b"the result")
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let answer: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(answer["executor_status"], 202);
    assert_eq!(answer["path"], "results/out.txt");
    assert_eq!(
        std::fs::read(job.output_dir.join("results/out.txt")).unwrap(),
        b"the result"
    );
    let (head, body) = tokio::time::timeout(Duration::from_secs(5), posts.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(head.starts_with("POST /outputs HTTP/1.1\r\n"), "{head}");
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body, serde_json::json!({ "paths": ["results/out.txt"] }));

    assert_eq!(
        job.request("POST", "/output?path=../escape", b"x")
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn output_without_a_reachable_executor_is_a_bad_gateway() {
    let unreachable = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let job = DemoJob::start(&[], &unreachable).await;
    let response = job.request("POST", "/output?path=a.txt", b"x").await;
    assert_eq!(response.status, 502, "{}", response.text());
}

#[tokio::test]
async fn exit_answers_then_exits_with_the_code() {
    let mut job = DemoJob::start(&[], "http://127.0.0.1:9").await;
    let response = job.request("GET", "/exit?code=3", b"").await;
    assert_eq!(response.status, 200);
    let status = tokio::time::timeout(Duration::from_secs(5), job.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(3));
}

#[tokio::test]
async fn fail_health_never_answers_2xx() {
    let job = DemoJob::start(&["--fail-health"], "http://127.0.0.1:9").await;
    for _ in 0..3 {
        let response = job.request("GET", "/health", b"").await;
        assert_eq!(response.status, 503);
    }
    // Everything else still works.
    assert_eq!(job.request("POST", "/echo", b"x").await.body, b"x");
}
