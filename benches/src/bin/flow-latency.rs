//! The streaming-job flow benchmark, every figure with its baseline from the same run:
//!
//! 1. Control-plane overhead: submit → verified endpoint on a real local testnet (facilitator,
//!    validator, miner, executor processes), minus the demo job's own start-up (spawn → first 2xx
//!    on `/health`, measured here by polling at 1 ms), with a per-hop breakdown from the time
//!    each status reaches the client.
//! 2. Tunnel request round trip (new tunnel stream, `GET /health`, verified receipt) against a
//!    direct TCP request to the same job program (new connection, `Connection: close`) — the
//!    target figure. Alongside: keep-alive requests on one persistent tunnel stream (one receipt
//!    for the whole stream, verified at its end) against keep-alive requests on one persistent
//!    direct TCP connection, i.e. the tunnel's forwarding cost without its per-stream costs
//!    (stream set-up, job TCP connect, the two signatures and their checks).
//! 3. Tunnel bulk throughput against raw quinn with the same transport config and direct TCP.
//!
//! `cargo run --release -p horde-benches --bin flow-latency -- [--jobs N] [--requests N]
//! [--size-mib N] [--json PATH]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use horde_node::client::{Client, JobRequest};
use horde_protocol::{JobId, JobStatus, SecretKey};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};
use horde_transport::tunnel::{
    JobTunnel, TunnelContext, TunnelStream, http_request, serve_job_endpoint,
};
use horde_transport::{ALPN_JOB, ClientPolicy, EndpointConfig, HordeEndpoint};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

struct Args {
    jobs: usize,
    requests: usize,
    size_mib: u64,
    json: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        jobs: 20,
        requests: 200,
        size_mib: 256,
        json: "target/flow-latency.json".to_owned(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--jobs" => args.jobs = value.parse()?,
            "--requests" => args.requests = value.parse()?,
            "--size-mib" => args.size_mib = value.parse()?,
            "--json" => args.json = value,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(args)
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

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Spawns the demo job directly and measures spawn → first 2xx on /health (1 ms polling).
async fn job_startup(
    program: &std::path::Path,
) -> anyhow::Result<(Duration, tokio::process::Child, u16)> {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let child = tokio::process::Command::new(program)
        .env("HORDE_JOB_PORT", port.to_string())
        .env("HORDE_VOLUME_DIR", dir.path())
        .env("HORDE_OUTPUT_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    loop {
        if direct_request(port, "GET /health")
            .await
            .is_ok_and(|s| s == 200)
        {
            return Ok((started.elapsed(), child, port));
        }
        if started.elapsed() > Duration::from_secs(10) {
            anyhow::bail!("demo job did not start");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One HTTP/1.1 request on a new TCP connection; returns the status code.
async fn direct_request(port: u16, request_line: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("{request_line} HTTP/1.1\r\nHost: job\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    Ok(text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
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

async fn tunnel_round_trips(
    testnet: &Testnet,
    program: &str,
    requests: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let client = Client::new(SecretKey::generate(), testnet.facilitator())?;
    let mut job = client.submit(&JobRequest::command("cpu", program)).await?;
    let endpoint = job.wait_for_endpoint().await?;
    let connection = job.connect_job(&endpoint).await?;
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let response = http_request(&connection.tunnel, "GET", "/health", b"").await?;
        anyhow::ensure!(response.status == 200, "status {}", response.status);
        samples.push(ms(started.elapsed()));
    }
    let keep_alive = tunnel_keep_alive_round_trips(&connection.tunnel, requests).await?;
    job.terminate().await?;
    job.wait_for_end().await?;
    Ok((samples, keep_alive))
}

/// A keep-alive `GET /health` (no `Connection: close`).
const KEEP_ALIVE_REQUEST: &[u8] = b"GET /health HTTP/1.1\r\nHost: job\r\n\r\n";

/// The length of the first complete `Content-Length` response in `buffer`, if it is all there.
fn complete_response(buffer: &[u8]) -> anyhow::Result<Option<usize>> {
    let Some(head_end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buffer[..head_end])?;
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .context("response without Content-Length")?;
    let total = head_end + 4 + length;
    Ok((buffer.len() >= total).then_some(total))
}

/// One end of a persistent connection carrying keep-alive requests.
trait KeepAlive {
    /// Sends one keep-alive request.
    async fn send_request(&mut self) -> anyhow::Result<()>;
    /// Appends the next bytes received to `buffer`.
    async fn receive(&mut self, buffer: &mut Vec<u8>) -> anyhow::Result<()>;
}

impl KeepAlive for TcpStream {
    async fn send_request(&mut self) -> anyhow::Result<()> {
        Ok(self.write_all(KEEP_ALIVE_REQUEST).await?)
    }

    async fn receive(&mut self, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "job closed mid-response");
        buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

impl KeepAlive for TunnelStream {
    async fn send_request(&mut self) -> anyhow::Result<()> {
        Ok(self.write(KEEP_ALIVE_REQUEST).await?)
    }

    async fn receive(&mut self, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
        let bytes = self.read().await?.context("tunnel ended mid-response")?;
        buffer.extend_from_slice(&bytes);
        Ok(())
    }
}

/// Times `requests` keep-alive `GET /health` round trips on one connection.
async fn keep_alive_round_trips(
    connection: &mut impl KeepAlive,
    requests: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(requests);
    let mut buffer = Vec::new();
    for _ in 0..requests {
        let started = Instant::now();
        connection.send_request().await?;
        let total = loop {
            if let Some(total) = complete_response(&buffer)? {
                break total;
            }
            connection.receive(&mut buffer).await?;
        };
        anyhow::ensure!(buffer.starts_with(b"HTTP/1.1 200"), "keep-alive status");
        buffer.drain(..total);
        samples.push(ms(started.elapsed()));
    }
    Ok(samples)
}

/// Keep-alive requests on one tunnel stream; the stream's receipt is verified at the end.
async fn tunnel_keep_alive_round_trips(
    tunnel: &JobTunnel,
    requests: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut stream = tunnel.open().await?;
    let samples = keep_alive_round_trips(&mut stream, requests).await?;
    stream.finish_sending().await?;
    while stream.read().await?.is_some() {}
    anyhow::ensure!(stream.receipt().is_some(), "no receipt");
    Ok(samples)
}

/// Keep-alive requests on one direct TCP connection.
async fn direct_keep_alive_round_trips(port: u16, requests: usize) -> anyhow::Result<Vec<f64>> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    keep_alive_round_trips(&mut tcp, requests).await
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

async fn direct_tcp_throughput(source: SocketAddr, size: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(source).await?;
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    anyhow::ensure!(total == size, "short read");
    Ok(gbit(size, started.elapsed()))
}

fn gbit(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
}

fn endpoint(key: &SecretKey, alpn: &[u8], policy: ClientPolicy) -> anyhow::Result<HordeEndpoint> {
    Ok(HordeEndpoint::bind(
        key,
        EndpointConfig::new(([127, 0, 0, 1], 0).into(), &[alpn]).with_client_policy(policy),
    )?)
}

async fn raw_quinn_throughput(size: u64) -> anyhow::Result<f64> {
    let server_key = SecretKey::generate();
    let client_key = SecretKey::generate();
    let server = endpoint(&server_key, ALPN_JOB, ClientPolicy::Any)?;
    let client = endpoint(&client_key, ALPN_JOB, ClientPolicy::Any)?;
    let addr = server.local_addr()?;
    let sender = tokio::spawn(async move {
        let (connection, _, _) = server.accept().await.context("accept")??;
        let (mut send, _recv) = connection.open_bi().await?;
        let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            send.write_chunk(chunk.slice(..n)).await?;
            left -= n as u64;
        }
        send.finish()?;
        connection.closed().await;
        anyhow::Ok(())
    });
    let connection = client.connect(addr, &server_key.hotkey(), ALPN_JOB).await?;
    let started = Instant::now();
    let (_send, mut recv) = connection.accept_bi().await?;
    let mut total = 0u64;
    while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
        total += chunk.bytes.len() as u64;
    }
    let elapsed = started.elapsed();
    connection.close(0u32.into(), b"done");
    let _ = sender.await;
    anyhow::ensure!(total == size, "raw quinn short read {total}");
    Ok(gbit(size, elapsed))
}

/// Request/response round trips over raw quinn (new stream per request, both ends here): the
/// floor any QUIC tunnel stream pays, to read the tunnel's ratio against.
async fn raw_quinn_round_trips(requests: usize) -> anyhow::Result<Vec<f64>> {
    let server_key = SecretKey::generate();
    let server = endpoint(&server_key, ALPN_JOB, ClientPolicy::Any)?;
    let client = endpoint(&SecretKey::generate(), ALPN_JOB, ClientPolicy::Any)?;
    let addr = server.local_addr()?;
    tokio::spawn(async move {
        let Some(Ok((connection, _, _))) = server.accept().await else {
            return;
        };
        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
            tokio::spawn(async move {
                if recv.read_to_end(64 * 1024).await.is_ok() {
                    let _ = send
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    let _ = send.finish();
                }
            });
        }
    });
    let connection = client.connect(addr, &server_key.hotkey(), ALPN_JOB).await?;
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(b"GET /health HTTP/1.1\r\nHost: job\r\nConnection: close\r\n\r\n")
            .await?;
        send.finish()?;
        let response = recv.read_to_end(64 * 1024).await?;
        anyhow::ensure!(response.ends_with(b"ok"), "raw quinn response");
        samples.push(ms(started.elapsed()));
    }
    connection.close(0u32.into(), b"done");
    Ok(samples)
}

async fn tunnel_throughput(source: SocketAddr, size: u64) -> anyhow::Result<f64> {
    let job_key = SecretKey::generate();
    let client_key = SecretKey::generate();
    let job_id = JobId::random();
    let server = endpoint(&job_key, ALPN_JOB, ClientPolicy::Only(client_key.hotkey()))?;
    let addr = server.local_addr()?;
    let handle = serve_job_endpoint(
        server,
        Arc::new(TunnelContext {
            job_id,
            job_key: job_key.clone(),
            client_key: client_key.hotkey(),
            target: source,
        }),
        tokio_util::sync::CancellationToken::new(),
    );
    let client = endpoint(&client_key, ALPN_JOB, ClientPolicy::Any)?;
    let connection = client.connect(addr, &job_key.hotkey(), ALPN_JOB).await?;
    let tunnel = JobTunnel::new(connection.clone(), job_id, client_key, job_key.hotkey())?;
    let started = Instant::now();
    let mut stream = tunnel.open().await?;
    stream.finish_sending().await?;
    let mut total = 0u64;
    while let Some(chunk) = stream.read().await? {
        total += chunk.len() as u64;
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(stream.receipt().is_some(), "no receipt");
    anyhow::ensure!(total == size, "tunnel short read {total}");
    connection.close(0u32.into(), b"done");
    handle.shutdown().await;
    Ok(gbit(size, elapsed))
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let program = demo_job_binary()?;
    let program_str = program.to_str().context("utf-8 path")?.to_owned();

    // Baseline: the job's own start-up, and direct TCP round trips to it.
    let mut startups = Vec::new();
    let mut direct_rtts = Vec::new();
    let mut direct_keep_alive = Vec::new();
    for round in 0..5 {
        let (startup, child, port) = job_startup(&program).await?;
        startups.push(ms(startup));
        if round == 0 {
            for _ in 0..args.requests {
                let started = Instant::now();
                anyhow::ensure!(direct_request(port, "GET /health").await? == 200);
                direct_rtts.push(ms(started.elapsed()));
            }
            direct_keep_alive = direct_keep_alive_round_trips(port, args.requests).await?;
        }
        drop(child);
    }
    let job_startup_ms = median(&mut startups);

    let testnet = Testnet::start(TestnetConfig {
        storage: 0,
        log_filter: "warn".to_owned(),
        ..TestnetConfig::default()
    })?;
    // Warm the connections (first QUIC handshakes) before measuring.
    control_plane(&testnet, &program_str, 1).await?;
    let samples = control_plane(&testnet, &program_str, args.jobs).await?;
    let (tunnel_rtts, mut tunnel_keep_alive) =
        tunnel_round_trips(&testnet, &program_str, args.requests).await?;
    testnet.shutdown();

    let mut quinn_rtts = raw_quinn_round_trips(args.requests).await?;
    let size = args.size_mib << 20;
    let source = tcp_source(size).await?;
    let direct = direct_tcp_throughput(source, size).await?;
    let quinn = raw_quinn_throughput(size).await?;
    let tunnel = tunnel_throughput(source, size).await?;

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

    let mut tunnel_sorted = tunnel_rtts.clone();
    let mut direct_sorted = direct_rtts.clone();
    let tunnel_median = median(&mut tunnel_sorted);
    let direct_median = median(&mut direct_sorted);
    let tunnel_p99 = percentile(&mut tunnel_sorted, 0.99);
    let direct_p99 = percentile(&mut direct_sorted, 0.99);
    println!(
        "== request round trip, GET /health ({} requests)",
        args.requests
    );
    println!("  direct TCP      median {direct_median:.3} ms  p99 {direct_p99:.3} ms");
    println!("  horde tunnel    median {tunnel_median:.3} ms  p99 {tunnel_p99:.3} ms");
    let quinn_median = median(&mut quinn_rtts);
    let quinn_p99 = percentile(&mut quinn_rtts, 0.99);
    println!(
        "  raw quinn       median {quinn_median:.3} ms  p99 {quinn_p99:.3} ms  (new stream, same process)"
    );
    println!(
        "  ratio tunnel/direct: {:.2} (target <= 2); tunnel/raw quinn: {:.2}",
        tunnel_median / direct_median,
        tunnel_median / quinn_median
    );
    let keep_direct_median = median(&mut direct_keep_alive);
    let keep_direct_p99 = percentile(&mut direct_keep_alive, 0.99);
    let keep_tunnel_median = median(&mut tunnel_keep_alive);
    let keep_tunnel_p99 = percentile(&mut tunnel_keep_alive, 0.99);
    println!(
        "== keep-alive GET /health on one persistent connection ({} requests; the tunnel's \
         receipt covers the whole stream, verified at its end)",
        args.requests
    );
    println!(
        "  direct TCP      median {keep_direct_median:.3} ms  p99 {keep_direct_p99:.3} ms  \
         (one connection)"
    );
    println!(
        "  horde tunnel    median {keep_tunnel_median:.3} ms  p99 {keep_tunnel_p99:.3} ms  \
         (one tunnel stream)"
    );
    println!(
        "  ratio tunnel/direct: {:.2}",
        keep_tunnel_median / keep_direct_median
    );

    println!("== bulk throughput, {} MiB job -> client", args.size_mib);
    println!(
        "  direct TCP   {direct:>6.2} Gbit/s  ({:.2}x raw quinn)",
        direct / quinn
    );
    println!("  raw quinn    {quinn:>6.2} Gbit/s  (1.00x)");
    println!(
        "  horde tunnel {tunnel:>6.2} Gbit/s  ({:.2}x raw quinn, target >= 0.7)",
        tunnel / quinn
    );

    let json = serde_json::json!({
        "jobs": args.jobs,
        "hops": hop_medians,
        "job_startup_ms": job_startup_ms,
        "submit_to_verified_endpoint_ms": total,
        "control_plane_overhead_ms": overhead,
        "rtt": {"direct_median_ms": direct_median, "direct_p99_ms": direct_p99,
                "tunnel_median_ms": tunnel_median, "tunnel_p99_ms": tunnel_p99,
                "raw_quinn_median_ms": quinn_median, "raw_quinn_p99_ms": quinn_p99,
                "ratio": tunnel_median / direct_median},
        "keep_alive_rtt": {"direct_median_ms": keep_direct_median,
                           "direct_p99_ms": keep_direct_p99,
                           "tunnel_median_ms": keep_tunnel_median,
                           "tunnel_p99_ms": keep_tunnel_p99,
                           "ratio": keep_tunnel_median / keep_direct_median},
        "throughput_gbit": {"direct_tcp": direct, "raw_quinn": quinn, "tunnel": tunnel,
                            "tunnel_over_quinn": tunnel / quinn},
    });
    if let Some(parent) = std::path::Path::new(&args.json).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", args.json);
    Ok(())
}
