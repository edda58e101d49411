//! The streaming-job flow benchmark, every figure with its baseline from the same run:
//!
//! 1. Control-plane overhead: submit → verified endpoint on a real local testnet (facilitator,
//!    validator, miner, executor processes), minus the demo job's own start-up (spawn → first 2xx
//!    on `/health`, measured here by polling at 1 ms), with a per-hop breakdown from the time
//!    each status reaches the client.
//! 2. Tunnel request round trip (new tunnel stream, `GET /health`) against a direct TCP request
//!    to a second instance of the same job program (new connection, `Connection: close`), the
//!    two alternating request by request so both see the same machine noise. The tunnel is timed
//!    twice per request: when the whole response has arrived, and when the job's receipt has
//!    been verified (when `http_request` returns) — the target figure. Alongside: keep-alive
//!    requests on one persistent tunnel stream (one receipt for the whole stream, verified at its
//!    end) against keep-alive requests on one persistent direct TCP connection, alternating,
//!    i.e. the tunnel's forwarding cost without its per-stream costs (stream set-up, job TCP
//!    connect, the two signatures and their checks).
//! 3. Tunnel bulk throughput against raw quinn with the same transport config and direct TCP,
//!    in alternating rounds (`--rounds`, default 3); each row reports its median and range.
//!    The tunnel is measured twice: to a job endpoint served in this process (from a TCP
//!    source), and to the testnet job's `GET /bytes` through the executor's own process, beside
//!    the same request over direct TCP to the directly started job.
//!
//! 4. The design's floor beside both (see `floor`): a plain quinn stream relayed to the job's TCP
//!    port with BLAKE3 digests of both directions, but no framing and no signatures, in its own
//!    process for the round trip and in both places for bulk. The tunnel's distance to this floor
//!    is its implementation's cost; the floor's distance to direct TCP or raw quinn is the
//!    design's.
//! 5. The runners side by side (see `runners`): submit → verified endpoint and the cost per
//!    tunnel connection of reaching the job's port, for the unisolated process runner, the
//!    isolated one (bubblewrap) and the container runner (when an engine answers), jobs and
//!    requests alternating between them, with the deltas over the unisolated runner.
//! 6. Against the reference system's path (see `reference`): nginx with mutual TLS in front of
//!    the job (default proxy buffering, and 256 KiB buffers) beside `horde job forward`, the Rust
//!    client's tunnel streams and direct TCP: new-connection and keep-alive requests, WebSocket
//!    echo, bulk, and one request per process (curl through nginx against `horde job request`),
//!    with the targets beside the ratios. nginx rows are skipped, saying so, when nginx
//!    is not installed (`.ci/bench-tools` installs it). `--reference-only` runs this alone;
//!    `--veth` runs it once more across a veth pair at MTU 1,500 between two network namespaces
//!    the bench creates and removes (`hbench-srv-PID` with the job, nginx and the testnet, whose
//!    job endpoints listen on 198.18.0.1; `hbench-cli-PID`, 198.18.0.2, with every client),
//!    skipped with a message unless run as root with `ip`.
//!    Its floor, in the same rounds (see `quinn_echo`): a bare quinn 32 B echo on one open
//!    stream, both ends in this process, on the multi-thread runtime and on current-thread ones.
//!    Beside the bulk rows: the UDP buffer errors counted during each row's transfers
//!    (`RcvbufErrors` of the clients' namespace, `SndbufErrors` of the servers').
//!
//! `cargo run --release -p horde-benches --bin flow-latency -- [--jobs N] [--requests N]
//! [--size-mib N] [--rounds N] [--reference-only] [--reference-rounds N]
//! [--reference-requests N] [--reference-processes N] [--veth] [--json PATH]`
//!
//! Layout: `flow-latency.rs` (the measurements and their report), `flow-latency/floor.rs` (the
//! design-floor relay), `flow-latency/runners.rs` (the runners compared),
//! `flow-latency/reference.rs` (the comparison with the reference's path),
//! `flow-latency/quinn_echo.rs` (its floor: what quinn allows for a round trip),
//! `flow-latency/raw_quinn.rs` (raw quinn's bulk rate and per-stream round trip),
//! `flow-latency/nginx.rs` (nginx with mutual TLS, its certificates and TLS client),
//! `flow-latency/udp_counters.rs` (the kernel's UDP buffer error and datagram counters read
//! around each bulk transfer of that comparison).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use horde_node::client::{Client, JobRequest};
use horde_protocol::{JobId, JobStatus, SecretKey};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};
use horde_transport::http;
use horde_transport::tunnel::{JobTunnel, TunnelContext, TunnelStream, serve_job_endpoint};
use horde_transport::{ALPN_JOB, ClientPolicy, EndpointConfig, HordeEndpoint};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[path = "flow-latency/floor.rs"]
mod floor;
#[path = "flow-latency/nginx.rs"]
mod nginx;
#[path = "flow-latency/quinn_echo.rs"]
mod quinn_echo;
#[path = "flow-latency/raw_quinn.rs"]
mod raw_quinn;
#[path = "flow-latency/reference.rs"]
mod reference;
#[path = "flow-latency/runners.rs"]
mod runners;
#[path = "flow-latency/udp_counters.rs"]
mod udp_counters;

/// The streaming-job flow benchmark: control plane, round trips and bulk, each beside its
/// baselines from the same run.
#[derive(Debug, clap::Parser)]
#[command(name = "flow-latency")]
struct Args {
    /// Jobs submitted for the control-plane figures.
    #[arg(long, default_value_t = 20)]
    jobs: usize,
    /// Requests for each round-trip figure.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Bytes per bulk transfer, MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Bulk rounds (rows alternate within each).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    rounds: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/flow-latency.json")]
    json: String,
    /// Only the comparison with the reference's path (nginx with mutual TLS), none of the rest.
    #[arg(long)]
    reference_only: bool,
    /// Rounds of the comparison with the reference's path.
    #[arg(long, default_value_t = 7, value_parser = at_least_one)]
    reference_rounds: usize,
    /// Requests (and WebSocket messages) per row and round in that comparison.
    #[arg(long, default_value_t = 50, value_parser = at_least_one)]
    reference_requests: usize,
    /// Processes of each kind per round in that comparison (one request each).
    #[arg(long, default_value_t = 5)]
    reference_processes: usize,
    /// Also runs that comparison across a veth pair (MTU 1,500) between two network namespaces
    /// the bench creates and removes: job, nginx and testnet in one, the clients in the other
    /// (root and `ip` needed; skipped with a message otherwise).
    #[arg(long)]
    veth: bool,
    /// Internal: run as the floor relay to this TCP address (the benchmark spawns itself).
    #[arg(long, hide = true)]
    floor_relay: Option<SocketAddr>,
}

/// A count of at least one (`--rounds`).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(count) if count >= 1 => Ok(count),
        _ => Err(format!("{text:?}: expected a whole number of at least 1")),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values.get(index).copied().unwrap_or(f64::NAN)
}

/// A sample set's median, p99 and range.
struct Spread {
    median: f64,
    p99: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Self {
        let median = median(&mut values);
        let p99 = percentile(&mut values, 0.99);
        Self {
            median,
            p99,
            min: values.first().copied().unwrap_or(f64::NAN),
            max: values.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn print_ms(&self, row: &str, note: &str) {
        println!(
            "  {row:<14} median {:.3} ms  p99 {:.3} ms  ({note})",
            self.median, self.p99
        );
    }

    fn print_gbit(&self, row: &str, quinn_median: f64) {
        println!(
            "  {row:<14} {:>6.2} Gbit/s [{:.2}-{:.2}]  ({:.2}x raw quinn)",
            self.median,
            self.min,
            self.max,
            self.median / quinn_median
        );
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"median": self.median, "p99": self.p99, "min": self.min,
                           "max": self.max})
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Spawns the demo job directly and measures spawn → first 2xx on /health (1 ms polling).
async fn job_startup(
    program: &std::path::Path,
) -> anyhow::Result<(Duration, tokio::process::Child, u16)> {
    let (startup, child, addr) = job_startup_on(program, Ipv4Addr::LOCALHOST.into()).await?;
    Ok((startup, child, addr.port()))
}

/// [`job_startup`] with the job listening on `host` (`HORDE_JOB_HOST`); its address.
async fn job_startup_on(
    program: &std::path::Path,
    host: IpAddr,
) -> anyhow::Result<(Duration, tokio::process::Child, SocketAddr)> {
    let addr = std::net::TcpListener::bind((host, 0))?.local_addr()?;
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let child = tokio::process::Command::new(program)
        .env("HORDE_JOB_PORT", addr.port().to_string())
        .env("HORDE_JOB_HOST", host.to_string())
        .env("HORDE_VOLUME_DIR", dir.path())
        .env("HORDE_OUTPUT_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    loop {
        if direct_request_to(addr, "GET /health")
            .await
            .is_ok_and(|s| s == 200)
        {
            return Ok((started.elapsed(), child, addr));
        }
        if started.elapsed() > Duration::from_secs(10) {
            anyhow::bail!("demo job did not start");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One HTTP/1.1 request on a new TCP connection; returns the status code.
async fn direct_request(port: u16, request_line: &str) -> anyhow::Result<u16> {
    direct_request_to(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), request_line).await
}

/// [`direct_request`] to `addr`.
async fn direct_request_to(addr: SocketAddr, request_line: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("{request_line} HTTP/1.1\r\nHost: job\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(match http::parse_response_head(&response) {
        Ok(Some(head)) => head.status,
        _ => 0,
    })
}

const HOPS: [&str; 6] = [
    "Received",
    "Assigned",
    "Accepted",
    "ExecutorReady",
    "EndpointReady",
    "verified",
];

async fn control_plane(
    testnet: &Testnet,
    program: &str,
    jobs: usize,
) -> anyhow::Result<Vec<[f64; 6]>> {
    let client = Client::new(SecretKey::generate(), testnet.facilitator())?;
    let mut request = JobRequest::command("cpu", program);
    request.deadlines.readiness_ms = 10_000;
    let mut samples = Vec::new();
    for _ in 0..jobs {
        let submitted = Instant::now();
        let mut job = client.submit(&request).await?;
        let mut times = [0.0f64; 6];
        loop {
            let update = job.next_status().await?.context("stream closed")?;
            let at = ms(submitted.elapsed());
            let index = match &update.status {
                JobStatus::Received => 0,
                JobStatus::Assigned { .. } => 1,
                JobStatus::Accepted => 2,
                JobStatus::ExecutorReady => 3,
                JobStatus::EndpointReady(_) => 4,
                other => anyhow::bail!("job did not start: {other:?}"),
            };
            times[index] = at;
            if index == 4 {
                break;
            }
        }
        job.wait_for_endpoint().await?;
        times[5] = ms(submitted.elapsed());
        samples.push(times);
        job.terminate().await?;
        job.wait_for_end().await?;
    }
    Ok(samples)
}

/// Round trips measured in the same run, direct and tunnel requests alternating so that both see
/// the same machine noise.
struct RoundTrips {
    /// New direct TCP connection per request (`Connection: close`), until the job's EOF.
    direct: Vec<f64>,
    /// New tunnel stream per request: until the whole response has arrived.
    tunnel_response: Vec<f64>,
    /// The same requests: until the job's receipt for the stream has been verified.
    tunnel_verified: Vec<f64>,
    /// Keep-alive requests on one direct TCP connection.
    direct_keep_alive: Vec<f64>,
    /// Keep-alive requests on one tunnel stream (its receipt verified at the end).
    tunnel_keep_alive: Vec<f64>,
    /// The same `GET /health` through the floor relay process, to the end of its stream.
    floor: Vec<f64>,
}

async fn round_trips(
    testnet: &Testnet,
    program: &str,
    direct_port: u16,
    floor_relay: &quinn::Connection,
    requests: usize,
) -> anyhow::Result<RoundTrips> {
    let client = Client::new(SecretKey::generate(), testnet.facilitator())?;
    let mut job = client.submit(&JobRequest::command("cpu", program)).await?;
    let endpoint = job.wait_for_endpoint().await?;
    let connection = job.connect_job(&endpoint).await?;
    let mut trips = RoundTrips {
        direct: Vec::with_capacity(requests),
        tunnel_response: Vec::with_capacity(requests),
        tunnel_verified: Vec::with_capacity(requests),
        direct_keep_alive: Vec::with_capacity(requests),
        tunnel_keep_alive: Vec::with_capacity(requests),
        floor: Vec::with_capacity(requests),
    };
    // Warm the paths once.
    direct_request(direct_port, "GET /health").await?;
    tunnel_request(&connection.tunnel).await?;
    floor_request(floor_relay).await?;
    for _ in 0..requests {
        let started = Instant::now();
        anyhow::ensure!(direct_request(direct_port, "GET /health").await? == 200);
        trips.direct.push(ms(started.elapsed()));
        let (response, verified) = tunnel_request(&connection.tunnel).await?;
        trips.tunnel_response.push(response);
        trips.tunnel_verified.push(verified);
        trips.floor.push(floor_request(floor_relay).await?);
    }

    let mut tcp = TcpStream::connect(("127.0.0.1", direct_port)).await?;
    tcp.set_nodelay(true)?;
    let mut stream = connection.tunnel.open().await?;
    let (mut tcp_buffer, mut tunnel_buffer) = (Vec::new(), Vec::new());
    for _ in 0..requests {
        let rtt = keep_alive_round_trip(&mut tcp, &mut tcp_buffer).await?;
        trips.direct_keep_alive.push(rtt);
        let rtt = keep_alive_round_trip(&mut stream, &mut tunnel_buffer).await?;
        trips.tunnel_keep_alive.push(rtt);
    }
    stream.finish_sending().await?;
    while stream.read().await?.is_some() {}
    anyhow::ensure!(stream.receipt().is_some(), "no receipt");
    job.terminate().await?;
    job.wait_for_end().await?;
    Ok(trips)
}

/// `GET /health` on a new tunnel stream, as [`horde_transport::tunnel::http_request`]
/// sends it, timed twice: when the
/// whole response has arrived, and when the stream ended with the job's receipt verified (the
/// moment `http_request` returns). Milliseconds.
async fn tunnel_request(tunnel: &JobTunnel) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let mut stream = tunnel.open().await?;
    stream
        .write_last(Bytes::from_static(
            b"GET /health HTTP/1.1\r\nHost: job\r\nConnection: close\r\n\r\n",
        ))
        .await?;
    let mut response = Vec::new();
    let mut complete = None;
    while let Some(bytes) = stream.read().await? {
        response.extend_from_slice(&bytes);
        if complete.is_none() && complete_response(&response)?.is_some() {
            complete = Some(ms(started.elapsed()));
        }
    }
    let verified = ms(started.elapsed());
    anyhow::ensure!(stream.receipt().is_some(), "no receipt");
    anyhow::ensure!(response.starts_with(b"HTTP/1.1 200"), "tunnel status");
    Ok((complete.context("incomplete response")?, verified))
}

/// `GET /health` on a new stream of the floor relay, to the end of the stream. Milliseconds.
async fn floor_request(relay: &quinn::Connection) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut response = Vec::new();
    floor::exchange(
        relay,
        b"GET /health HTTP/1.1\r\nHost: job\r\nConnection: close\r\n\r\n",
        |bytes| response.extend_from_slice(bytes),
    )
    .await?;
    let elapsed = ms(started.elapsed());
    anyhow::ensure!(response.starts_with(b"HTTP/1.1 200"), "floor relay status");
    Ok(elapsed)
}

/// A keep-alive `GET /health` (no `Connection: close`).
const KEEP_ALIVE_REQUEST: &[u8] = b"GET /health HTTP/1.1\r\nHost: job\r\n\r\n";

/// The length of the first complete response in `buffer`, if it is all there (a response
/// framed by the connection's end is an error: it cannot be told complete).
fn complete_response(buffer: &[u8]) -> anyhow::Result<Option<usize>> {
    Ok(http::complete_response_len(buffer)?)
}

/// One end of a persistent connection carrying keep-alive requests (or WebSocket frames).
trait Duplex {
    /// Sends `bytes`.
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()>;
    /// Appends the next bytes received to `buffer`.
    async fn receive(&mut self, buffer: &mut Vec<u8>) -> anyhow::Result<()>;
}

impl Duplex for TcpStream {
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        Ok(self.write_all(bytes).await?)
    }

    async fn receive(&mut self, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "job closed mid-response");
        buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

impl Duplex for TunnelStream {
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        Ok(self.write(bytes).await?)
    }

    async fn receive(&mut self, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
        let bytes = self.read().await?.context("tunnel ended mid-response")?;
        buffer.extend_from_slice(&bytes);
        Ok(())
    }
}

/// One keep-alive `GET /health` round trip on `connection`; milliseconds.
async fn keep_alive_round_trip(
    connection: &mut impl Duplex,
    buffer: &mut Vec<u8>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    connection.send(KEEP_ALIVE_REQUEST).await?;
    let total = loop {
        if let Some(total) = complete_response(buffer)? {
            break total;
        }
        connection.receive(buffer).await?;
    };
    let elapsed = ms(started.elapsed());
    anyhow::ensure!(buffer.starts_with(b"HTTP/1.1 200"), "keep-alive status");
    buffer.drain(..total);
    Ok(elapsed)
}

/// A TCP source that writes `size` bytes to every connection, then closes.
async fn tcp_source(size: u64) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let chunk = vec![0x5au8; 256 * 1024];
        while let Ok((mut stream, _)) = listener.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if stream.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = stream.shutdown().await;
                // Drain what the tunnel sends (nothing) until it closes.
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    Ok(addr)
}

/// Bulk figures (Gbit/s), one per round.
#[derive(Default)]
struct BulkRuns {
    /// Direct TCP from the in-process TCP source.
    direct: Vec<f64>,
    /// Raw quinn, both ends in this process.
    quinn: Vec<f64>,
    /// A tunnel stream to a job endpoint served in this process, from the TCP source.
    tunnel: Vec<f64>,
    /// `GET /bytes` over direct TCP to the directly started job.
    direct_job: Vec<f64>,
    /// `GET /bytes` through a tunnel stream to a testnet job (the executor's own process).
    executor: Vec<f64>,
    /// The floor relay in this process, from the TCP source.
    floor: Vec<f64>,
    /// `GET /bytes` through the floor relay process to the directly started job.
    floor_process: Vec<f64>,
}

/// `GET /bytes?n={size}` over a new TCP connection to the job; Gbit/s of body received.
async fn direct_bytes(port: u16, size: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(bytes_request(size).as_bytes()).await?;
    let total = read_to_eof(&mut stream).await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(total > size, "direct /bytes short read {total}");
    Ok(gbit(size, elapsed))
}

/// `GET /bytes?n={size}` on a new tunnel stream, its receipt verified; Gbit/s of body received.
async fn tunnel_bytes(tunnel: &JobTunnel, size: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let total = tunnel_exchange(tunnel, bytes_request(size).as_bytes()).await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(total > size, "tunnel /bytes short read {total}");
    Ok(gbit(size, elapsed))
}

/// Sends `request` on a new tunnel stream and reads the reply to its verified receipt; returns
/// the bytes received.
async fn tunnel_exchange(tunnel: &JobTunnel, request: &[u8]) -> anyhow::Result<u64> {
    let mut stream = tunnel.open().await?;
    stream.write(request).await?;
    stream.finish_sending().await?;
    let mut total = 0u64;
    while let Some(chunk) = stream.read().await? {
        total += chunk.len() as u64;
    }
    anyhow::ensure!(stream.receipt().is_some(), "no receipt");
    Ok(total)
}

/// Sends `request` through the floor relay on `connection` and reads the reply; Gbit/s of the
/// `size` bytes asked for.
async fn floor_bytes(
    connection: &quinn::Connection,
    request: &[u8],
    size: u64,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let total = floor::exchange(connection, request, |_| {}).await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(total >= size, "floor relay short read {total}");
    Ok(gbit(size, elapsed))
}

/// Reads `stream` to its end, counting the bytes.
async fn read_to_eof(stream: &mut TcpStream) -> std::io::Result<u64> {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

fn bytes_request(size: u64) -> String {
    format!("GET /bytes?n={size} HTTP/1.1\r\nHost: job\r\nConnection: close\r\n\r\n")
}

async fn direct_tcp_throughput(source: SocketAddr, size: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(source).await?;
    let total = read_to_eof(&mut stream).await?;
    anyhow::ensure!(total == size, "short read");
    Ok(gbit(size, started.elapsed()))
}

fn gbit(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
}

/// A bench endpoint with `key` on an ephemeral port of `ip` (`LOOPBACK` unless the row crosses a
/// veth pair), accepting `alpn` from the peers `policy` lets in.
fn endpoint(
    key: &SecretKey,
    ip: IpAddr,
    alpn: &[u8],
    policy: ClientPolicy,
) -> anyhow::Result<HordeEndpoint> {
    Ok(HordeEndpoint::bind(
        key,
        EndpointConfig::new((ip, 0).into(), &[alpn]).with_client_policy(policy),
    )?)
}

/// Where the bench's endpoints bind unless a row crosses a veth pair.
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A job-protocol endpoint on loopback that admits any client key (the bench's usual one).
fn loopback_endpoint(key: &SecretKey) -> anyhow::Result<HordeEndpoint> {
    endpoint(key, LOOPBACK, ALPN_JOB, ClientPolicy::Any)
}

async fn tunnel_throughput(source: SocketAddr, size: u64) -> anyhow::Result<f64> {
    let job_key = SecretKey::generate();
    let client_key = SecretKey::generate();
    let job_id = JobId::random();
    let server = endpoint(
        &job_key,
        LOOPBACK,
        ALPN_JOB,
        ClientPolicy::Only(client_key.hotkey()),
    )?;
    let addr = server.local_addr()?;
    let handle = serve_job_endpoint(
        server,
        Arc::new(TunnelContext {
            job_id,
            job_key: job_key.clone(),
            client_key: client_key.hotkey(),
            target: Arc::new(source),
        }),
        tokio_util::sync::CancellationToken::new(),
    );
    let client = loopback_endpoint(&client_key)?;
    let connection = client.connect(addr, &job_key.hotkey(), ALPN_JOB).await?;
    let tunnel = JobTunnel::new(connection.clone(), job_id, client_key, job_key.hotkey())?;
    let started = Instant::now();
    let total = tunnel_exchange(&tunnel, b"").await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(total == size, "tunnel short read {total}");
    connection.close(0u32.into(), b"done");
    handle.shutdown().await;
    Ok(gbit(size, elapsed))
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Some(target) = args.floor_relay {
        return runtime.block_on(floor::run_process(target));
    }
    runtime.block_on(run(args))
}

/// Everything one run measures, before it is reported.
struct Measured {
    job_startup_ms: f64,
    samples: Vec<[f64; 6]>,
    trips: RoundTrips,
    quinn_rtts: Vec<f64>,
    bulk: BulkRuns,
    runner_rows: Vec<runners::RunnerRow>,
    runners: runners::RunnerSamples,
    reference: reference::Samples,
}

impl Args {
    fn reference_plan(&self) -> reference::Plan {
        reference::Plan {
            rounds: self.reference_rounds,
            requests: self.reference_requests,
            processes: self.reference_processes,
            size: self.size_mib << 20,
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut json = if args.reference_only {
        reference::run_alone(args.reference_plan()).await?
    } else {
        run_all(&args).await?
    };
    if args.veth {
        let plan = args.reference_plan();
        json["reference_veth"] = tokio::task::spawn_blocking(move || reference::run_veth(plan))
            .await
            .context("the veth comparison panicked")??;
    }
    if let Some(parent) = std::path::Path::new(&args.json).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", args.json);
    Ok(())
}

/// Every section; the run's JSON.
async fn run_all(args: &Args) -> anyhow::Result<serde_json::Value> {
    let measured = measure(args).await?;
    let control = report_control_plane(args, &measured);
    let (rtt, keep_alive) = report_round_trips(args, measured.trips, measured.quinn_rtts);
    let throughput = report_bulk(args, measured.bulk);
    let runners = runners::report(&measured.runner_rows, measured.runners);
    let mut json = control;
    json["runners"] = runners;
    json["rtt"] = rtt;
    json["keep_alive_rtt"] = keep_alive;
    json["throughput_gbit"] = throughput;
    json["reference"] = reference::report(
        args.reference_plan(),
        &reference::Net::LOOPBACK,
        measured.reference,
    );
    Ok(json)
}

/// Runs every measurement: the job's own start-up, the control plane, round trips, bulk.
async fn measure(args: &Args) -> anyhow::Result<Measured> {
    let program = demo_job_binary()?;
    let program_str = program.to_str().context("utf-8 path")?.to_owned();

    // Baseline: the job's own start-up. The last job started here stays up as the target of
    // the direct TCP requests, which alternate with the tunnel's.
    let mut startups = Vec::new();
    let mut direct_job = None;
    for _ in 0..5 {
        let (startup, child, port) = job_startup(&program).await?;
        startups.push(ms(startup));
        direct_job = Some((child, port));
    }
    let (direct_child, direct_port) = direct_job.context("no direct job")?;
    let job_startup_ms = median(&mut startups);

    let runner_rows = runners::rows(&program_str).await;
    let testnet = Testnet::start(TestnetConfig {
        storage: 0,
        log_filter: "warn".to_owned(),
        more_classes: runners::classes(&runner_rows),
        ..TestnetConfig::default()
    })?;
    // Warm the connections (first QUIC handshakes) before measuring.
    control_plane(&testnet, &program_str, 1).await?;
    let samples = control_plane(&testnet, &program_str, args.jobs).await?;
    let runners = runners::measure(&testnet, &runner_rows, args.jobs, args.requests).await?;
    let relay_process =
        floor::RelayProcess::spawn(std::net::SocketAddr::from(([127, 0, 0, 1], direct_port)))
            .await?;
    let relay_client = floor::RelayClient::connect(&relay_process.addr).await?;
    let trips = round_trips(
        &testnet,
        &program_str,
        direct_port,
        &relay_client.connection,
        args.requests,
    )
    .await?;
    let quinn_rtts = raw_quinn::raw_quinn_round_trips(args.requests).await?;

    // Bulk: a job on the testnet sends `/bytes` through the real executor process; the direct
    // job sends the same over TCP; raw quinn and an in-process tunnel (job endpoint served in
    // this process from a TCP source) complete the set. Rows alternate, round after round; each
    // row's figure is its median.
    let size = args.size_mib << 20;
    let source = tcp_source(size).await?;
    let in_process_relay = floor::RelayClient::connect(&floor::start_in_process(source)?).await?;
    let client = Client::new(SecretKey::generate(), testnet.facilitator())?;
    let mut bulk_job = client
        .submit(&JobRequest::command("cpu", &program_str))
        .await?;
    let endpoint = bulk_job.wait_for_endpoint().await?;
    let bulk_connection = bulk_job.connect_job(&endpoint).await?;
    let mut bulk = BulkRuns::default();
    for _ in 0..args.rounds {
        bulk.direct.push(direct_tcp_throughput(source, size).await?);
        bulk.quinn
            .push(raw_quinn::raw_quinn_throughput(size, None).await?);
        bulk.tunnel.push(tunnel_throughput(source, size).await?);
        bulk.direct_job.push(direct_bytes(direct_port, size).await?);
        bulk.executor
            .push(tunnel_bytes(&bulk_connection.tunnel, size).await?);
        bulk.floor
            .push(floor_bytes(&in_process_relay.connection, b"", size).await?);
        bulk.floor_process.push(
            floor_bytes(
                &relay_client.connection,
                bytes_request(size).as_bytes(),
                size,
            )
            .await?,
        );
    }
    bulk_job.terminate().await?;
    bulk_job.wait_for_end().await?;
    let reference = reference::measure(
        args.reference_plan(),
        &reference::Net::LOOPBACK,
        &testnet.facilitator().to_string(),
        &program_str,
        SocketAddr::from((Ipv4Addr::LOCALHOST, direct_port)),
    )
    .await?;
    testnet.shutdown();
    drop(direct_child);
    Ok(Measured {
        job_startup_ms,
        samples,
        trips,
        quinn_rtts,
        bulk,
        runner_rows,
        runners,
        reference,
    })
}

/// Prints the control-plane table; the JSON of the run's scalar figures.
fn report_control_plane(args: &Args, measured: &Measured) -> serde_json::Value {
    let samples = &measured.samples;
    let job_startup_ms = measured.job_startup_ms;
    println!(
        "== control plane: submit -> verified endpoint ({} jobs, medians, ms since submit)",
        args.jobs
    );
    let mut previous = 0.0;
    let mut hop_medians = Vec::new();
    for (index, hop) in HOPS.iter().enumerate() {
        let mut column: Vec<f64> = samples.iter().map(|s| s[index]).collect();
        let at = median(&mut column);
        println!("  {hop:<14} {at:>8.2}   (+{:.2})", at - previous);
        hop_medians.push(serde_json::json!({"status": hop, "median_ms": at}));
        previous = at;
    }
    let mut totals: Vec<f64> = samples.iter().map(|s| s[5]).collect();
    let total = median(&mut totals);
    let overhead = total - job_startup_ms;
    println!("  job start-up (spawn -> /health 2xx, direct, median of 5): {job_startup_ms:.2}");
    println!(
        "  control-plane overhead = {total:.2} - {job_startup_ms:.2} = {overhead:.2} ms (target <= 20)"
    );

    serde_json::json!({
        "jobs": args.jobs,
        "hops": hop_medians,
        "job_startup_ms": job_startup_ms,
        "submit_to_verified_endpoint_ms": total,
        "control_plane_overhead_ms": overhead,
    })
}

/// Prints the round-trip tables; the JSON of new-stream and keep-alive round trips.
fn report_round_trips(
    args: &Args,
    trips: RoundTrips,
    quinn_rtts: Vec<f64>,
) -> (serde_json::Value, serde_json::Value) {
    println!(
        "== request round trip, GET /health, new connection / new tunnel stream ({} requests, \
         direct and tunnel alternating)",
        args.requests
    );
    let direct = Spread::of(trips.direct);
    let response = Spread::of(trips.tunnel_response);
    let verified = Spread::of(trips.tunnel_verified);
    let quinn_rtt = Spread::of(quinn_rtts);
    direct.print_ms("direct TCP", "until the job's EOF");
    response.print_ms("horde tunnel", "until the whole response has arrived");
    verified.print_ms(
        "horde tunnel",
        "until the receipt is verified (http_request returns)",
    );
    quinn_rtt.print_ms("raw quinn", "new stream, both ends in this process");
    let floor_rtt = Spread::of(trips.floor);
    floor_rtt.print_ms(
        "design floor",
        "relay process: quinn + TCP hop + digests, no framing or signatures",
    );
    println!(
        "  ratio tunnel/direct: {:.2} with the verified receipt (target <= 2), {:.2} to the \
         response; tunnel/raw quinn: {:.2}",
        verified.median / direct.median,
        response.median / direct.median,
        verified.median / quinn_rtt.median
    );
    println!(
        "  ratio floor/direct: {:.2} (what the design itself costs here); tunnel/floor: {:.2}",
        floor_rtt.median / direct.median,
        verified.median / floor_rtt.median
    );
    println!(
        "== keep-alive GET /health on one persistent connection ({} requests, alternating; the \
         tunnel's receipt covers the whole stream, verified at its end)",
        args.requests
    );
    let keep_direct = Spread::of(trips.direct_keep_alive);
    let keep_tunnel = Spread::of(trips.tunnel_keep_alive);
    keep_direct.print_ms("direct TCP", "one connection");
    keep_tunnel.print_ms("horde tunnel", "one tunnel stream");
    println!(
        "  ratio tunnel/direct: {:.2}",
        keep_tunnel.median / keep_direct.median
    );

    (
        serde_json::json!({"direct": direct.json(), "tunnel_response": response.json(),
            "tunnel_verified": verified.json(), "raw_quinn": quinn_rtt.json(),
            "ratio": verified.median / direct.median,
            "ratio_to_response": response.median / direct.median,
            "floor": floor_rtt.json(), "floor_ratio": floor_rtt.median / direct.median}),
        serde_json::json!({"direct": keep_direct.json(), "tunnel": keep_tunnel.json(),
            "ratio": keep_tunnel.median / keep_direct.median}),
    )
}

/// Prints the bulk table; its JSON.
fn report_bulk(args: &Args, bulk: BulkRuns) -> serde_json::Value {
    println!(
        "== bulk throughput, {} MiB job -> client ({} rounds, rows alternating; median [min-max])",
        args.size_mib, args.rounds
    );
    let direct_bulk = Spread::of(bulk.direct);
    let quinn = Spread::of(bulk.quinn);
    let tunnel = Spread::of(bulk.tunnel);
    let direct_job = Spread::of(bulk.direct_job);
    let executor = Spread::of(bulk.executor);
    let floor_bulk = Spread::of(bulk.floor);
    let floor_process = Spread::of(bulk.floor_process);
    direct_bulk.print_gbit("direct TCP", quinn.median);
    quinn.print_gbit("raw quinn", quinn.median);
    tunnel.print_gbit("horde tunnel", quinn.median);
    floor_bulk.print_gbit("design floor", quinn.median);
    println!("  (job's GET /bytes, through the testnet's executor process / the relay process)");
    direct_job.print_gbit("direct TCP", quinn.median);
    executor.print_gbit("horde tunnel", quinn.median);
    floor_process.print_gbit("design floor", quinn.median);
    println!(
        "  tunnel/raw quinn: {:.2} in process, {:.2} through the executor (target >= 0.7)",
        tunnel.median / quinn.median,
        executor.median / quinn.median
    );
    println!(
        "  design floor/raw quinn: {:.2} in process, {:.2} in its own process; tunnel/floor: \
         {:.2} and {:.2}",
        floor_bulk.median / quinn.median,
        floor_process.median / quinn.median,
        tunnel.median / floor_bulk.median,
        executor.median / floor_process.median
    );

    serde_json::json!({"rounds": args.rounds, "direct_tcp": direct_bulk.json(),
        "raw_quinn": quinn.json(), "tunnel": tunnel.json(),
        "tunnel_over_quinn": tunnel.median / quinn.median,
        "direct_tcp_job_bytes": direct_job.json(),
        "tunnel_executor_job_bytes": executor.json(),
        "executor_tunnel_over_quinn": executor.median / quinn.median,
        "floor": floor_bulk.json(),
        "floor_over_quinn": floor_bulk.median / quinn.median,
        "floor_process": floor_process.json(),
        "floor_process_over_quinn": floor_process.median / quinn.median})
}
