//! The reference system's path beside horde's (issue 19): the same demo job program reached
//! directly over TCP, through nginx with mutual TLS (default proxy buffering, and 256 KiB proxy
//! buffers; see `nginx`), through `horde job forward` (the CLI process, a plain TCP client on
//! its port), and through the Rust client's own tunnel streams (`JobConnection`, this process).
//! nginx and the direct rows reach the directly started job; `forward`, the Rust client and
//! `horde job request` reach one testnet job submitted with `horde job run` (the same program,
//! run by the executor).
//!
//! Measured in rounds (`--reference-rounds`, 7 by default), every row once per round in turn:
//! `GET /health` on a new connection each (TLS: a full handshake, no resumption; the tunnel: a
//! new stream, until its receipt verified), keep-alive `GET /health` on one connection, a 32 B
//! WebSocket binary message echoed, `GET /bytes` of `--size-mib` (one transfer per row and
//! round), and one request per process (`curl` through nginx with the client certificate,
//! `curl` direct, `horde job request`, each `POST /echo`, spawn to exit, answers checked).
//! Ratios are against nginx with default buffers (bulk also against 256 KiB buffers), printed
//! beside the targets. Each round also measures the floors of the horde rows, with
//! horde's TLS and transport config and both ends in this process: a bare quinn 32 B echo on
//! one open stream (loopback), and one bare quinn stream of `--size-mib` (the bulk rate a single
//! QUIC stream reaches on this machine, without the tunnel, the executor or `forward`; across
//! the veth pair its sender lives in the server's namespace, so it crosses the pair at the
//! pair's packet size). Beside the bulk rows: the kernel's UDP datagram counts per GiB in each
//! namespace and quinn's own counts on the Rust client's connection, which say whether the
//! segmentation offloads batch (a GSO send and a GRO super-datagram count once each).
//!
//! Layout: `reference.rs` (the paths, the rounds and their samples), `reference/report.rs` (the
//! tables, per-round ratios, floors and UDP counters, and the JSON).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use horde_benches::netns::{self, SERVER_IP, VethPair};
use horde_node::client::{JobConnection, VerifiedEndpoint, now};
use horde_protocol::codec::from_bytes_exact;
use horde_protocol::{EndpointRecord, JobId, SecretKey, Signed};
use horde_testnet::demo_job::websocket::{OPCODE_BINARY, OPCODE_CLOSE, decode_frame, encode_frame};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};
use horde_transport::tunnel::JobTunnel;

#[path = "reference/report.rs"]
mod report;

pub(crate) use report::report;

use super::nginx::{self, Conn, Dial, Nginx};
use super::quinn_echo;
use super::udp_counters::{Counters, UdpCounts, UdpSnmpFile};
use super::{Duplex, bytes_request, gbit, keep_alive_round_trip, ms, tunnel_bytes};

/// The body of every one-request-per-process `POST /echo`.
const ECHO_BODY: &str = "one shot";

/// A `GET /health` closing its connection.
const CLOSE_REQUEST: &[u8] = b"GET /health HTTP/1.1\r\nHost: job\r\nConnection: close\r\n\r\n";

/// The WebSocket opening handshake (RFC 6455's sample key).
const WS_UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: job\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// The echoed WebSocket message's size.
const WS_MESSAGE: usize = 32;

/// The veth pair's MTU (`--veth`): what an Ethernet path carries.
const VETH_MTU: u32 = 1500;

/// Where the rows run: all on loopback, or across a veth pair (`--veth`) with the job, nginx and
/// the testnet in the server's namespace and every client (the measuring threads, `horde job
/// forward`, `horde job request`, curl, the Rust client) in the client's.
pub(crate) struct Net<'a> {
    /// The address of the server side's listeners: the direct job, nginx, the job endpoint.
    server_ip: IpAddr,
    /// The veth pair, when across one.
    pair: Option<&'a VethPair>,
    /// The runtime whose threads live in the server's namespace, when across a veth pair.
    server_runtime: Option<tokio::runtime::Handle>,
}

impl Net<'_> {
    /// Everything on loopback.
    pub(crate) const LOOPBACK: Net<'static> = Net {
        server_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        pair: None,
        server_runtime: None,
    };

    /// Where the bare quinn bulk floor's sender runs: across the pair when there is one.
    fn far_side(&self) -> Option<super::raw_quinn::FarSide<'_>> {
        Some(super::raw_quinn::FarSide {
            namespace: &self.pair?.server,
            runtime: self.server_runtime.as_ref()?,
            ip: self.server_ip,
        })
    }

    /// Runs `work` (which reaches the testnet's nodes on their loopback addresses, or starts a
    /// server) in the server's namespace.
    fn on_server<T: Send>(
        &self,
        work: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        match self.pair {
            Some(pair) => netns::run_in(&pair.server, work),
            None => work(),
        }
    }

    /// What the report's title says about the path.
    fn describe(&self) -> String {
        match self.pair {
            Some(_) => format!(
                "veth pair, MTU {VETH_MTU}: job, nginx and testnet in one namespace, the clients \
                 in the other"
            ),
            None => "loopback".to_owned(),
        }
    }
}

/// How many of each measurement one run makes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) rounds: usize,
    /// Requests (and WebSocket messages) per row and round.
    pub(crate) requests: usize,
    /// Processes of each kind per round.
    pub(crate) processes: usize,
    pub(crate) size: u64,
}

/// The rows, in the order they run in every round.
const ROWS: [&str; 5] = [
    "direct TCP",
    "nginx mTLS",
    "nginx mTLS 256k",
    "job forward",
    "Rust client",
];
const NGINX: usize = 1;
const NGINX_LARGE: usize = 2;
const FORWARD: usize = 3;
const CLIENT: usize = 4;

/// Samples of one measurement, per row.
type PerRow = [Vec<f64>; 5];

/// Everything the reference comparison measured.
#[derive(Default)]
pub(crate) struct Samples {
    new_connection: PerRow,
    keep_alive: PerRow,
    websocket: PerRow,
    bulk: PerRow,
    /// Spawn to exit: curl through nginx, curl direct, `horde job request`.
    processes: [Vec<f64>; 3],
    /// The Rust client on `client::one_thread_runtime`: keep-alive, WebSocket echo.
    client_one_thread: [Vec<f64>; 2],
    /// The same client's bulk `GET /bytes` (Gbit/s).
    client_one_thread_bulk: Vec<f64>,
    /// The floor: a bare quinn 32 B echo, per [`quinn_echo::ROWS`].
    quinn_echo: [Vec<f64>; 3],
    /// The bulk floor: bare quinn, one stream of `--size-mib`, both ends in this process.
    quinn_bulk: Vec<f64>,
    /// Per bulk row, summed over the rounds: `RcvbufErrors` of the clients' namespace (the
    /// receiving sockets: `forward`'s and this process's) and `SndbufErrors` of the servers'
    /// (the executor's); on loopback both are the one namespace's.
    bulk_udp: [UdpCounts; 5],
    /// The Rust client's connection over its bulk transfers, summed over the rounds.
    client_quinn: QuinnTally,
    nginx: bool,
}

/// What quinn counted on the Rust client's connection over its bulk transfers: datagrams and
/// receive calls in, datagrams and send calls out (its ACKs), and the path MTU at the end.
#[derive(Debug, Default)]
struct QuinnTally {
    rx_datagrams: u64,
    rx_ios: u64,
    tx_datagrams: u64,
    tx_ios: u64,
    mtu: u16,
}

impl QuinnTally {
    fn add(&mut self, before: &quinn::ConnectionStats, after: &quinn::ConnectionStats) {
        self.rx_datagrams += after.udp_rx.datagrams - before.udp_rx.datagrams;
        self.rx_ios += after.udp_rx.ios - before.udp_rx.ios;
        self.tx_datagrams += after.udp_tx.datagrams - before.udp_tx.datagrams;
        self.tx_ios += after.udp_tx.ios - before.udp_tx.ios;
        self.mtu = after.path.current_mtu;
    }
}

/// The testnet job submitted with `horde job run`, its forwarder and the Rust client's
/// connection to it.
struct HordeSide {
    horde: PathBuf,
    state: tempfile::TempDir,
    job: String,
    forward: tokio::process::Child,
    forward_addr: SocketAddr,
    connection: JobConnection,
}

/// Runs `horde` with the state directory; its output, failing unless it exits 0.
fn run_horde(horde: &Path, state: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    horde_benches::run_tool(Command::new(horde).args(args).env("HORDE_STATE_DIR", state))
}

/// The job's connection as `horde job request` makes it: from the state `horde job run` left.
async fn connect_from_state(state: &Path, job: &str) -> anyhow::Result<JobConnection> {
    let job_id: JobId = job.parse().map_err(|_| anyhow::anyhow!("job id {job:?}"))?;
    let text = std::fs::read_to_string(state.join("jobs").join(format!("{job}.json")))?;
    let saved: serde_json::Value = serde_json::from_str(&text)?;
    let field = |name: &str| {
        saved[name]
            .as_str()
            .with_context(|| format!("job state without {name}"))
    };
    let signed: Signed<EndpointRecord> =
        from_bytes_exact(&hex::decode(field("endpoint")?)?).context("endpoint record")?;
    let endpoint = VerifiedEndpoint::verify(&signed, job_id, &field("miner")?.parse()?, now())?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(field("client_seed")?, &mut seed)?;
    Ok(JobConnection::connect(job_id, SecretKey::from_seed(&seed), &endpoint).await?)
}

impl HordeSide {
    async fn start(net: &Net<'_>, facilitator: &str, program: &str) -> anyhow::Result<Self> {
        let horde = horde_testnet::horde_binary()?;
        let state = tempfile::tempdir()?;
        let spec = state.path().join("job.toml");
        std::fs::write(
            &spec,
            format!(
                "executor_class = \"cpu\"\nprogram = \"{program}\"\nreadiness_http = \"/health\"\n"
            ),
        )?;
        let spec = spec.to_string_lossy().into_owned();
        let output = net.on_server(|| {
            run_horde(
                &horde,
                state.path(),
                &["job", "run", "--spec", &spec, "--facilitator", facilitator],
            )
        })?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let job = text
            .lines()
            .find_map(|line| line.strip_prefix("job "))
            .map(|id| id.trim().to_owned())
            .with_context(|| format!("no job id in {text}"))?;
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port();
        let forward_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let forward = tokio::process::Command::new(&horde)
            .args([
                "job",
                "forward",
                &job,
                "--listen",
                &forward_addr.to_string(),
            ])
            .env("HORDE_STATE_DIR", state.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting horde job forward")?;
        let started = Instant::now();
        while !super::direct_request(port, "GET /health")
            .await
            .is_ok_and(|status| status == 200)
        {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("horde job forward did not answer on {forward_addr}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let connection = connect_from_state(state.path(), &job).await?;
        Ok(Self {
            horde,
            state,
            job,
            forward,
            forward_addr,
            connection,
        })
    }

    /// One `horde job request POST /echo` process; milliseconds, spawn to exit.
    fn request_process(&self) -> anyhow::Result<f64> {
        let started = Instant::now();
        let output = run_horde(
            &self.horde,
            self.state.path(),
            &[
                "job", "request", &self.job, "POST", "/echo", "--data", ECHO_BODY,
            ],
        )?;
        let elapsed = ms(started.elapsed());
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.stdout != ECHO_BODY.as_bytes() || !stderr.contains("receipt verified") {
            bail!("horde job request: incomplete answer: {stderr}");
        }
        Ok(elapsed)
    }

    async fn stop(mut self, net: &Net<'_>) {
        self.connection.close().await;
        let _ = self.forward.kill().await;
        let _ = net.on_server(|| {
            run_horde(
                &self.horde,
                self.state.path(),
                &["job", "terminate", &self.job],
            )
        });
    }
}

/// Runs blocking client code (the TCP and TLS rows) off the runtime's workers' duty.
fn blocking<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

impl Duplex for Conn {
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.write_all(bytes)?;
        Ok(self.flush()?)
    }

    async fn receive(&mut self, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "connection closed mid-response");
        buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// `GET /health` on a new connection, until the whole response has arrived; milliseconds.
async fn new_connection_request(dial: &Dial) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut conn = dial.connect()?;
    conn.send(CLOSE_REQUEST).await?;
    let mut buffer = Vec::new();
    while super::complete_response(&buffer)?.is_none() {
        conn.receive(&mut buffer).await?;
    }
    let elapsed = ms(started.elapsed());
    anyhow::ensure!(buffer.starts_with(b"HTTP/1.1 200"), "status of {dial:?}");
    Ok(elapsed)
}

/// `requests` keep-alive round trips on `conn` after one to warm it; milliseconds each.
async fn keep_alive_trips(conn: &mut impl Duplex, requests: usize) -> anyhow::Result<Vec<f64>> {
    let mut buffer = Vec::new();
    keep_alive_round_trip(conn, &mut buffer).await?;
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        samples.push(keep_alive_round_trip(conn, &mut buffer).await?);
    }
    Ok(samples)
}

/// Opens a WebSocket on `conn`, then `messages` echoes of a 32 B binary message after one to
/// warm it (milliseconds each), then closes it.
async fn websocket_echoes(conn: &mut impl Duplex, messages: usize) -> anyhow::Result<Vec<f64>> {
    let mut buffer = Vec::new();
    conn.send(WS_UPGRADE).await?;
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        conn.receive(&mut buffer).await?;
    };
    anyhow::ensure!(
        buffer.starts_with(b"HTTP/1.1 101"),
        "WebSocket not accepted"
    );
    buffer.drain(..head_end);
    let payload = [0x61u8; WS_MESSAGE];
    let frame = encode_frame(true, OPCODE_BINARY, &payload, Some([7, 1, 9, 3]));
    let mut samples = Vec::with_capacity(messages);
    for index in 0..=messages {
        let started = Instant::now();
        conn.send(&frame).await?;
        let (echo, used) = loop {
            match decode_frame(&buffer, 1 << 16) {
                Ok(Some(decoded)) => break decoded,
                Ok(None) => conn.receive(&mut buffer).await?,
                Err(error) => bail!("WebSocket frame: {error}"),
            }
        };
        let elapsed = ms(started.elapsed());
        anyhow::ensure!(echo.payload == payload, "WebSocket echo differs");
        buffer.drain(..used);
        if index > 0 {
            samples.push(elapsed);
        }
    }
    conn.send(&encode_frame(
        true,
        OPCODE_CLOSE,
        &1000u16.to_be_bytes(),
        Some([7, 1, 9, 3]),
    ))
    .await?;
    Ok(samples)
}

/// `GET /bytes?n={size}` on a new connection until the whole body has arrived; Gbit/s.
async fn bulk(dial: &Dial, size: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut conn = dial.connect()?;
    conn.send(bytes_request(size).as_bytes()).await?;
    let mut buffer = vec![0u8; 256 * 1024];
    let (mut head, mut body) = (Vec::new(), None::<u64>);
    while body.is_none_or(|received| received < size) {
        let n = conn.read(&mut buffer)?;
        anyhow::ensure!(n > 0, "{dial:?}: closed after {body:?} of {size} bytes");
        match &mut body {
            Some(received) => *received += n as u64,
            None => {
                head.extend_from_slice(&buffer[..n]);
                if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    anyhow::ensure!(head.starts_with(b"HTTP/1.1 200"), "bulk status");
                    body = Some((head.len() - at - 4) as u64);
                }
            }
        }
    }
    Ok(gbit(size, started.elapsed()))
}

/// The Rust client's keep-alive round trips and WebSocket echoes, each on a tunnel stream of
/// its own whose receipt is checked at its end.
async fn client_trips(tunnel: &JobTunnel, requests: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut stream = tunnel.open().await?;
    let keep_alive = keep_alive_trips(&mut stream, requests).await?;
    stream.finish_sending().await?;
    while stream.read().await?.is_some() {}
    anyhow::ensure!(
        stream.receipt().is_some(),
        "no receipt for the keep-alive stream"
    );
    let mut stream = tunnel.open().await?;
    let websocket = websocket_echoes(&mut stream, requests).await?;
    stream.finish_sending().await?;
    while stream.read().await?.is_some() {}
    anyhow::ensure!(
        stream.receipt().is_some(),
        "no receipt for the WebSocket stream"
    );
    Ok((keep_alive, websocket))
}

/// [`client_trips`] and one bulk `GET /bytes` of `size` from a client on
/// `horde_node::client::one_thread_runtime` (one thread, as the blocking TLS client of the nginx
/// rows and as `horde job forward`, spinning before it sleeps as `forward` does), on its own
/// connection made from the job's state.
fn one_thread_client(
    state: &Path,
    job: &str,
    requests: usize,
    size: u64,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, f64)> {
    let runtime = horde_node::client::one_thread_runtime(true)?;
    runtime.block_on(async {
        let connection = connect_from_state(state, job).await?;
        let measured = async {
            let (keep_alive, websocket) = client_trips(&connection.tunnel, requests).await?;
            let bulk = super::tunnel_bytes(&connection.tunnel, size).await?;
            anyhow::Ok((keep_alive, websocket, bulk))
        }
        .await;
        connection.close().await;
        measured
    })
}

/// Every row's figure of one round.
async fn round(
    plan: Plan,
    net: &Net<'_>,
    dials: &[Option<Dial>; 4],
    side: &HordeSide,
    samples: &mut Samples,
    counters: &mut Counters,
) -> anyhow::Result<()> {
    let tunnel = &side.connection.tunnel;
    for (row, dial) in dials.iter().enumerate() {
        let Some(dial) = dial else { continue };
        let row_samples = blocking(async {
            let mut new_connection = Vec::with_capacity(plan.requests);
            for _ in 0..plan.requests {
                new_connection.push(new_connection_request(dial).await?);
            }
            let keep_alive = keep_alive_trips(&mut dial.connect()?, plan.requests).await?;
            let websocket = websocket_echoes(&mut dial.connect()?, plan.requests).await?;
            anyhow::Ok((new_connection, keep_alive, websocket))
        })
        .with_context(|| format!("row {}", ROWS[row]))?;
        samples.new_connection[row].extend(row_samples.0);
        samples.keep_alive[row].extend(row_samples.1);
        samples.websocket[row].extend(row_samples.2);
    }
    for _ in 0..plan.requests {
        let (_, verified) = super::tunnel_request(tunnel).await?;
        samples.new_connection[CLIENT].push(verified);
    }
    let (keep_alive, websocket) = client_trips(tunnel, plan.requests).await?;
    samples.keep_alive[CLIENT].extend(keep_alive);
    samples.websocket[CLIENT].extend(websocket);
    let (state, job, requests, size) = (
        side.state.path().to_owned(),
        side.job.clone(),
        plan.requests,
        plan.size,
    );
    let (keep_alive, websocket, bulk_rate) =
        tokio::task::spawn_blocking(move || one_thread_client(&state, &job, requests, size))
            .await??;
    samples.client_one_thread[0].extend(keep_alive);
    samples.client_one_thread[1].extend(websocket);
    samples.client_one_thread_bulk.push(bulk_rate);

    for (row, dial) in dials.iter().enumerate() {
        if let Some(dial) = dial {
            let sum = &mut samples.bulk_udp[row];
            let rate = counters
                .around(sum, async { blocking(bulk(dial, plan.size)) })
                .await?;
            samples.bulk[row].push(rate);
        }
    }
    let sum = &mut samples.bulk_udp[CLIENT];
    let before = tunnel.connection().stats();
    let rate = counters
        .around(sum, tunnel_bytes(tunnel, plan.size))
        .await?;
    samples
        .client_quinn
        .add(&before, &tunnel.connection().stats());
    samples.bulk[CLIENT].push(rate);
    samples
        .quinn_bulk
        .push(super::raw_quinn::raw_quinn_throughput(plan.size, net.far_side()).await?);
    for (row, trips) in quinn_echo::round(plan.requests)
        .await?
        .into_iter()
        .enumerate()
    {
        samples.quinn_echo[row].extend(trips);
    }
    Ok(())
}

/// Measures every row in `plan.rounds` rounds; nginx proxies to the job at `direct`. Runs on
/// the clients' side of `net`.
pub(crate) async fn measure(
    plan: Plan,
    net: &Net<'_>,
    facilitator: &str,
    program: &str,
    direct: SocketAddr,
) -> anyhow::Result<Samples> {
    let side = HordeSide::start(net, facilitator, program).await?;
    let nginx_dir = tempfile::tempdir()?;
    let nginx = net.on_server(|| nginx::start(nginx_dir.path(), net.server_ip, direct))?;
    let tls = |nginx: &Nginx, addr| Dial::Tls(addr, nginx.tls.clone());
    let dials = [
        Some(Dial::Tcp(direct)),
        nginx.as_ref().map(|n| tls(n, n.default_buffers)),
        nginx.as_ref().map(|n| tls(n, n.large_buffers)),
        Some(Dial::Tcp(side.forward_addr)),
    ];
    let mut samples = Samples {
        nginx: nginx.is_some(),
        ..Samples::default()
    };
    let mut counters = Counters {
        clients: UdpSnmpFile::open()?,
        servers: match net.pair {
            Some(_) => Some(net.on_server(UdpSnmpFile::open)?),
            None => None,
        },
    };
    for index in 0..plan.rounds {
        eprintln!("reference round {}/{}", index + 1, plan.rounds);
        round(plan, net, &dials, &side, &mut samples, &mut counters).await?;
        for _ in 0..plan.processes {
            if let Some(nginx) = &nginx {
                samples.processes[0].push(nginx::curl_echo(nginx, ECHO_BODY)?);
            }
            samples.processes[1].push(nginx::curl_direct_echo(direct, ECHO_BODY)?);
            samples.processes[2].push(side.request_process()?);
        }
    }
    drop(nginx);
    side.stop(net).await;
    Ok(samples)
}

/// The comparison with the reference's path alone (`--reference-only`): a direct job, a
/// testnet, and the rows of `reference`.
pub(crate) async fn run_alone(plan: Plan) -> anyhow::Result<serde_json::Value> {
    let program = demo_job_binary()?;
    let program_str = program.to_str().context("utf-8 path")?.to_owned();
    let (_, direct_child, direct_port) = super::job_startup(&program).await?;
    let testnet = Testnet::start(TestnetConfig {
        storage: 0,
        log_filter: "warn".to_owned(),
        ..TestnetConfig::default()
    })?;
    let samples = measure(
        plan,
        &Net::LOOPBACK,
        &testnet.facilitator().to_string(),
        &program_str,
        SocketAddr::from((Ipv4Addr::LOCALHOST, direct_port)),
    )
    .await?;
    testnet.shutdown();
    drop(direct_child);
    Ok(serde_json::json!({"reference": report(plan, &Net::LOOPBACK, samples)}))
}

/// The same comparison across a veth pair (`--veth`): namespaces and the pair created here and
/// removed at the end; the job, nginx and a testnet whose job endpoints listen on the server's
/// veth address in one namespace, every client in the other. Skipped, saying why, unless this
/// runs as root with `ip` installed. Blocking: call it off the runtime.
pub(crate) fn run_veth(plan: Plan) -> anyhow::Result<serde_json::Value> {
    if let Some(reason) = netns::unavailable() {
        println!(
            "== against the reference's path across a veth pair: skipped: flow-latency --veth {reason}"
        );
        return Ok(serde_json::json!({ "skipped": reason }));
    }
    let program = demo_job_binary()?;
    let program_str = program.to_str().context("utf-8 path")?.to_owned();
    let server_ip: IpAddr = SERVER_IP.parse()?;
    let pair = VethPair::create(VETH_MTU)?;
    let server = netns::runtime_in(&pair.server)?;
    let client = netns::runtime_in(&pair.client)?;
    // `block_on` runs its future on the calling thread: each one runs on a thread that entered
    // the runtime's namespace.
    let (direct_child, direct) = netns::run_in(&pair.server, || {
        server.block_on(async {
            let (_, child, addr) = super::job_startup_on(&program, server_ip).await?;
            anyhow::Ok((child, addr))
        })
    })?;
    let testnet = netns::run_in(&pair.server, || {
        Testnet::start(TestnetConfig {
            storage: 0,
            log_filter: "warn".to_owned(),
            job_host: Some(server_ip),
            ..TestnetConfig::default()
        })
    })?;
    let net = Net {
        server_ip,
        pair: Some(&pair),
        server_runtime: Some(server.handle().clone()),
    };
    let facilitator = testnet.facilitator().to_string();
    let samples = netns::run_in(&pair.client, || {
        client.block_on(measure(plan, &net, &facilitator, &program_str, direct))
    });
    testnet.shutdown();
    drop(direct_child);
    drop((client, server));
    Ok(serde_json::json!({"reference_veth": report(plan, &net, samples?)}))
}
