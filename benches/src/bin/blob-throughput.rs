//! Blob throughput on loopback, with its baselines measured in the same run.
//!
//! `cargo run --release -p horde-benches --bin blob-throughput -- --size 1GiB [--rounds 5]
//! [--json PATH]` (`--only quinn,mem` runs a subset, for profiling one path; the table of record
//! runs all). `BLOB_BENCH_STATS=1` prints each quinn sender's path statistics (loss, congestion
//! events, MTU, UDP sends and datagrams: datagrams per send show segmentation offload at work).
//! `BLOB_BENCH_MAX_UDP_PAYLOAD=1452` caps MTU discovery as quinn's default does (default: horde's
//! `MAX_UDP_PAYLOAD`, 8,972).
//!
//! Measures, one after the other on 127.0.0.1 with both ends in this process:
//! (a) plain TCP, (b) TCP + rustls TLS 1.3 (horde's ed25519 certificates and verifiers),
//! (c) raw quinn with horde's TransportConfig (one stream, `write_chunk` of a static 1 MiB buffer,
//! `read_chunk` on the other side), (c') the same receiver copying into fresh memory (a new
//! buffer of the blob's size per transfer): the floor of any get into fresh memory, which pays
//! the kernel for every new page, (d) horde blob get memory→memory with verification, the way
//! a client fetches a blob into memory (`get_to_memory`: a new connection, a fresh buffer),
//! (d') the same into a reused buffer on an open connection, (e) horde verified get file→file
//! from a storage node's disk store, fsync included.
//! Each is measured once per round, in alternating rounds (a, b, c, c', d, d', e, a, b, …), so that
//! the machine's noise falls on every row alike; the table gives per row the median of the
//! rounds (and min–max) of Gbit/s, CPU seconds per GB (process user+system time) and page faults
//! per GiB, and the ratio of its median to raw quinn's median. It writes the same, with every
//! round, as JSON, then measures a resume: a get cut at ~50% and resumed, reporting the bytes
//! sent again beyond the missing half.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use horde_node::client::blob::{
    self, TransferPolicy, get_into_buffer, get_to_file_once, get_to_memory,
};
use horde_node::client::progress::{NoProgress, Progress};
use horde_node::server::storage::{BlobStore, StoreLimits, serve};
use horde_protocol::blob::CHUNK_GROUP_LEN;
use horde_protocol::{NodeAddr, SecretKey};
use horde_transport::blob::{BlobBuffer, PROGRESS_TIMEOUT, ServedBlob, read_request, serve_get};
use horde_transport::{
    ALPN_BLOB, ClientPolicy, EndpointConfig, HordeEndpoint, IncomingConnection, TransportTuning,
    client_tls_config, default_validity, self_signed_certificate, server_name_for,
    server_tls_config,
};
use tokio_util::sync::CancellationToken;

const CHUNK: usize = 1 << 20;
/// Rounds by default: the median of five is steady against one disturbed round, and five rounds
/// of 1 GiB take about a minute.
const DEFAULT_ROUNDS: usize = 5;
/// The targets, as ratios of medians to raw quinn's.
const TARGETS: [(&str, f64); 2] = [(MEM, 0.90), (FILE, 0.75)];

const TCP: &str = "tcp";
const TLS: &str = "tcp+tls1.3";
const QUINN: &str = "raw quinn";
const QUINN_FRESH: &str = "raw quinn → fresh memory";
const MEM: &str = "horde get mem→mem";
const MEM_REUSED: &str = "horde get mem→mem (reused buffer)";
const FILE: &str = "horde get file→file";
/// Clock ticks per second of `/proc/self/stat` times (`getconf CLK_TCK`, 100 on Linux).
const CLOCK_TICKS: f64 = 100.0;

/// Blob transfer throughput: horde's get paths beside TCP, TLS and raw quinn, in alternating
/// rounds.
#[derive(Debug, clap::Parser)]
#[command(name = "blob-throughput")]
struct Args {
    /// Bytes per transfer (`1GiB`, `256MiB`, `500MB`, …; at least 1 MiB). Also
    /// `BLOB_BENCH_SIZE`.
    #[arg(long, env = "BLOB_BENCH_SIZE", default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/blob-throughput.json")]
    json: PathBuf,
    /// Measurements to run (`tcp`, `tls`, `quinn`, `mem`, `file`), comma-separated; all when
    /// absent. For profiling one path; the table of record runs them all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Measured rounds (each row once per round).
    #[arg(long, default_value_t = DEFAULT_ROUNDS, value_parser = at_least_one)]
    rounds: usize,
}

impl Args {
    fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|only| only == name)
    }
}

fn parse_size(text: &str) -> anyhow::Result<u64> {
    let size = parse_size_text(text)?;
    if size < CHUNK as u64 {
        bail!("the size must be at least 1 MiB");
    }
    Ok(size)
}

fn parse_size_text(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().context("size must start with a number")?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => bail!("unknown size unit {other:?}"),
    };
    Ok(number * factor)
}

/// Process-wide counters from `/proc/self/stat` (all threads, live and exited).
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    /// CPU time (user + system) in seconds.
    cpu: f64,
    /// Minor page faults (fresh or reclaimed pages touched).
    faults: f64,
}

fn usage() -> Usage {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Usage::default();
    };
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return Usage::default();
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // minflt is field 10, utime field 14, stime field 15 (1-based); `rest` starts at field 3.
    Usage {
        cpu: (field(11) + field(12)) / CLOCK_TICKS,
        faults: field(7),
    }
}

#[derive(Debug, Clone)]
struct Measurement {
    name: &'static str,
    bytes: u64,
    seconds: f64,
    cpu: f64,
    faults: f64,
}

impl Measurement {
    fn gbits(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }

    fn cpu_per_gb(&self) -> f64 {
        self.cpu / (self.bytes as f64 / 1e9)
    }

    fn faults_per_gib(&self) -> f64 {
        self.faults / (self.bytes as f64 / f64::from(1u32 << 30))
    }
}

/// Profiles only the measured transfers: with `BLOB_BENCH_PERF_CTL=CTL_FIFO[,ACK_FIFO]`, writes
/// `enable` / `disable` to a `perf record|stat --control fifo:CTL_FIFO,ACK_FIFO -D -1` around each
/// measurement (waiting for perf's `ack` when an ack fifo is given).
/// With `BLOB_BENCH_PERF_CTL=callgrind` (under `valgrind --tool=callgrind`), zeroes callgrind's
/// counters at the start and dumps them at the end with `callgrind_control` instead (the
/// measured window is the dump numbered `.1`, `.2`, …).
fn perf_control(command: &str) {
    let Ok(fifos) = std::env::var("BLOB_BENCH_PERF_CTL") else {
        return;
    };
    if fifos == "callgrind" {
        let switch = if command == "enable" { "-z" } else { "-d" };
        let status = std::process::Command::new("callgrind_control")
            .arg(switch)
            .arg(std::process::id().to_string())
            .stdout(std::process::Stdio::null())
            .status();
        if let Err(error) = status {
            eprintln!("callgrind_control: {error}");
        }
        return;
    }
    let (control, ack) = match fifos.split_once(',') {
        Some((control, ack)) => (control, Some(ack)),
        None => (fifos.as_str(), None),
    };
    let sent = std::fs::OpenOptions::new()
        .write(true)
        .open(control)
        .and_then(|mut fifo| fifo.write_all(format!("{command}\n").as_bytes()));
    if let Err(error) = sent {
        eprintln!("perf control {control}: {error}");
        return;
    }
    if let Some(ack) = ack {
        let mut reply = [0u8; 5];
        let _ = std::fs::File::open(ack).and_then(|mut fifo| {
            use std::io::Read as _;
            fifo.read(&mut reply)
        });
    }
}

async fn measure<F, Fut>(
    name: &'static str,
    round: usize,
    bytes: u64,
    run: F,
) -> anyhow::Result<Measurement>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    perf_control("enable");
    let before = usage();
    let start = Instant::now();
    run().await?;
    let seconds = start.elapsed().as_secs_f64();
    let after = usage();
    perf_control("disable");
    let measurement = Measurement {
        name,
        bytes,
        seconds,
        cpu: after.cpu - before.cpu,
        faults: after.faults - before.faults,
    };
    eprintln!(
        "round {}, {name}: {:.2} Gbit/s, {:.2} CPU s/GB, {:.0} page faults/GiB",
        round + 1,
        measurement.gbits(),
        measurement.cpu_per_gb(),
        measurement.faults_per_gib()
    );
    Ok(measurement)
}

fn chunk_count(size: u64) -> u64 {
    size / CHUNK as u64
}

/// (a) plain TCP: blocking sockets, one thread per end.
fn tcp(size: u64, chunk: &Bytes) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let chunk = chunk.clone();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stream = TcpStream::connect(addr)?;
        for _ in 0..chunk_count(size) {
            stream.write_all(&chunk)?;
        }
        Ok(())
    });
    let (mut stream, _) = listener.accept()?;
    let received = drain(&mut stream)?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    check_received(received, size)
}

fn drain(reader: &mut impl std::io::Read) -> std::io::Result<u64> {
    let mut buffer = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(read) => total += read as u64,
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(total),
            Err(error) => return Err(error),
        }
    }
}

fn check_received(received: u64, size: u64) -> anyhow::Result<()> {
    let expected = chunk_count(size) * CHUNK as u64;
    if received != expected {
        bail!("received {received} bytes, expected {expected}");
    }
    Ok(())
}

/// (b) TCP + rustls TLS 1.3 with horde's certificates and verifiers.
fn tls(size: u64, chunk: &Bytes) -> anyhow::Result<()> {
    let server_key = SecretKey::from_seed(&[1; 32]);
    let client_key = SecretKey::from_seed(&[2; 32]);
    let validity = default_validity(SystemTime::now());
    let alpn = b"bench".to_vec();
    let server_config = Arc::new(server_tls_config(
        &server_key,
        self_signed_certificate(&server_key, validity)?,
        std::slice::from_ref(&alpn),
        ClientPolicy::Any,
    )?);
    let client_config = Arc::new(client_tls_config(
        &client_key,
        self_signed_certificate(&client_key, validity)?,
        &alpn,
    )?);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let chunk = chunk.clone();
    let server_name = server_name_for(&server_key.hotkey());
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        let socket = TcpStream::connect(addr)?;
        let connection = rustls::ClientConnection::new(client_config, server_name)?;
        let mut stream = rustls::StreamOwned::new(connection, socket);
        for _ in 0..chunk_count(size) {
            stream.write_all(&chunk)?;
        }
        stream.conn.send_close_notify();
        stream.flush()?;
        Ok(())
    });
    let (socket, _) = listener.accept()?;
    let connection = rustls::ServerConnection::new(server_config)?;
    let mut stream = rustls::StreamOwned::new(connection, socket);
    let received = drain(&mut stream)?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    check_received(received, size)
}

fn quic_endpoint(seed: u8) -> anyhow::Result<HordeEndpoint> {
    let mut tuning = TransportTuning::default();
    if let Ok(value) = std::env::var("BLOB_BENCH_MAX_UDP_PAYLOAD") {
        tuning.max_udp_payload = value.parse().context("BLOB_BENCH_MAX_UDP_PAYLOAD")?;
    }
    let config = EndpointConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), &[ALPN_BLOB])
        .with_transport(tuning);
    Ok(HordeEndpoint::bind(
        &SecretKey::from_seed(&[seed; 32]),
        config,
    )?)
}

async fn connected(
    client: &HordeEndpoint,
    server: &HordeEndpoint,
) -> anyhow::Result<(quinn::Connection, quinn::Connection)> {
    let (addr, hotkey) = (server.local_addr()?, server.hotkey());
    let (dialed, accepted) =
        tokio::join!(client.connect(addr, &hotkey, ALPN_BLOB), server.accept());
    let accepted = accepted.context("server closed")??.connection;
    Ok((dialed?, accepted))
}

/// (c) raw quinn: one stream, static 1 MiB chunks. With `fresh` — (c') — the receiver copies
/// them into a new buffer of the blob's size, left in `fresh` (freed outside the measurement,
/// as the memory rows' results are).
async fn raw_quinn(size: u64, chunk: &Bytes, fresh: Option<&mut Vec<u8>>) -> anyhow::Result<()> {
    let (client, server) = (quic_endpoint(3)?, quic_endpoint(4)?);
    let (client_connection, server_connection) = connected(&client, &server).await?;
    let chunk = chunk.clone();
    let sender = tokio::spawn(async move {
        let (mut send, _recv) = server_connection.open_bi().await?;
        for _ in 0..chunk_count(size) {
            send.write_chunk(chunk.clone()).await?;
        }
        send.finish()?;
        send.stopped().await?;
        print_stats("raw quinn sender", &server_connection);
        anyhow::Ok(())
    });
    let (_send, mut recv) = client_connection.accept_bi().await?;
    let mut memory = match fresh {
        Some(_) => Vec::with_capacity(usize::try_from(size)?),
        None => Vec::new(),
    };
    let mut received = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        received += chunk.bytes.len() as u64;
        if fresh.is_some() {
            memory.extend_from_slice(&chunk.bytes);
        }
    }
    sender.await??;
    if let Some(slot) = fresh {
        *slot = memory;
    }
    check_received(received, size)
}

/// With `BLOB_BENCH_STATS` set, prints the sender's path statistics (loss, congestion events).
fn print_stats(what: &str, connection: &quinn::Connection) {
    if std::env::var_os("BLOB_BENCH_STATS").is_none() {
        return;
    }
    let stats = connection.stats();
    eprintln!(
        "{what}: MTU {}, sent {} packets, lost {} ({} bytes), congestion events {}, cwnd {}, \
         rtt {:?}; udp tx {:?} rx {:?}",
        stats.path.current_mtu,
        stats.path.sent_packets,
        stats.path.lost_packets,
        stats.path.lost_bytes,
        stats.path.congestion_events,
        stats.path.cwnd,
        stats.path.rtt,
        stats.udp_tx,
        stats.udp_rx,
    );
}

/// Serves one in-memory blob on every stream of every connection.
async fn serve_memory(server: Arc<HordeEndpoint>, blob: ServedBlob) {
    while let Some(Ok(IncomingConnection { connection, .. })) = server.accept().await {
        let blob = blob.clone();
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                let blob = blob.clone();
                let connection = connection.clone();
                tokio::spawn(async move {
                    if let Ok(Some(horde_protocol::blob::BlobRequest::Get { ranges, .. })) =
                        read_request(&mut recv).await
                    {
                        let _ = serve_get(&mut send, &blob, &ranges, PROGRESS_TIMEOUT).await;
                        let _ = send.stopped().await;
                        print_stats("horde mem sender", &connection);
                    }
                });
            }
        });
    }
}

/// Counts what was verified; closes the connection at half if asked to.
struct Cut {
    connection: Option<quinn::Connection>,
    total: u64,
    done: u64,
}

impl Progress for Cut {
    fn start(&mut self, total: u64, done: u64) {
        self.total = total;
        self.done = done;
    }

    fn update(&mut self, done: u64) {
        self.done = done;
        if done >= self.total / 2
            && let Some(connection) = self.connection.take()
        {
            connection.close(0u32.into(), b"bench cut");
        }
    }
}

fn sample(size: u64) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = Vec::with_capacity(size as usize);
    while (data.len() as u64) < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(size as usize);
    data
}

#[derive(Debug)]
struct ResumeReport {
    size: u64,
    verified_before_cut: u64,
    resumed_from: u64,
    fetched_after_resume: u64,
    resent_beyond_missing: i64,
}

async fn resume_measurement(
    client: &HordeEndpoint,
    storage: &NodeAddr,
    hash: horde_protocol::BlobHash,
    size: u64,
    work: &Path,
) -> anyhow::Result<ResumeReport> {
    let dest = work.join("resume.out");
    let connection = blob::connect(client, storage).await?;
    let mut cut = Cut {
        connection: Some(connection.clone()),
        total: 0,
        done: 0,
    };
    let first = get_to_file_once(
        &connection,
        hash,
        &dest,
        None,
        u64::MAX,
        PROGRESS_TIMEOUT,
        &mut cut,
    )
    .await;
    if first.is_ok() {
        bail!("the cut did not interrupt the transfer");
    }
    let connection = blob::connect(client, storage).await?;
    let outcome = get_to_file_once(
        &connection,
        hash,
        &dest,
        None,
        u64::MAX,
        PROGRESS_TIMEOUT,
        &mut NoProgress,
    )
    .await?;
    let missing = size - cut.done;
    Ok(ResumeReport {
        size,
        verified_before_cut: cut.done,
        resumed_from: outcome.resumed_from,
        fetched_after_resume: outcome.fetched,
        resent_beyond_missing: outcome.fetched as i64 - missing as i64,
    })
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

/// The rounds of one row.
#[derive(Debug, Default)]
struct Row {
    rounds: Vec<Measurement>,
}

impl Row {
    fn median_of(&self, value: fn(&Measurement) -> f64) -> f64 {
        let mut values: Vec<f64> = self.rounds.iter().map(value).collect();
        median(&mut values)
    }

    fn range_of(&self, value: fn(&Measurement) -> f64) -> (f64, f64) {
        let values = self.rounds.iter().map(value);
        let min = values.clone().fold(f64::INFINITY, f64::min);
        (min, values.fold(f64::NEG_INFINITY, f64::max))
    }
}

/// The median (the mean of the middle two for an even count); NaN for none.
/// A count of at least one (`--rounds`).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(count) if count >= 1 => Ok(count),
        _ => Err(format!("{text:?}: expected a whole number of at least 1")),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}

/// Every row's rounds, in the order the rows run.
#[derive(Debug, Default)]
struct Results {
    rows: Vec<(&'static str, Row)>,
}

impl Results {
    fn push(&mut self, measurement: Measurement) {
        match self
            .rows
            .iter_mut()
            .find(|(name, _)| *name == measurement.name)
        {
            Some((_, row)) => row.rounds.push(measurement),
            None => self.rows.push((
                measurement.name,
                Row {
                    rounds: vec![measurement],
                },
            )),
        }
    }

    fn row(&self, name: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|(row, _)| *row == name)
            .map(|(_, row)| row)
    }

    /// Raw quinn's rate in `round`, for the ratios within one round.
    fn quinn_in_round(&self, round: usize) -> Option<f64> {
        self.row(QUINN)
            .and_then(|row| row.rounds.get(round))
            .map(Measurement::gbits)
    }
}

/// A blob served from memory and the client's reusable buffer for the memory rows.
struct MemoryRows {
    server: NodeAddr,
    connection: quinn::Connection,
    task: tokio::task::JoinHandle<()>,
    reused: BlobBuffer,
}

/// A storage node's disk store and the connection for the file row.
struct FileRows {
    work: tempfile::TempDir,
    storage: NodeAddr,
    connection: quinn::Connection,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Serves the blob from memory and fills a reusable buffer once (not measured): from then on
/// its memory is mapped, the same footing as raw quinn, which allocates nothing per transfer.
async fn memory_rows(
    client: &HordeEndpoint,
    blob: ServedBlob,
    hash: horde_protocol::BlobHash,
) -> anyhow::Result<MemoryRows> {
    let server = Arc::new(quic_endpoint(5)?);
    let addr = NodeAddr {
        hotkey: server.hotkey(),
        addrs: vec![server.local_addr()?],
    };
    let task = tokio::spawn(serve_memory(server, blob));
    let connection = blob::connect(client, &addr).await?;
    let mut reused = BlobBuffer::new();
    get_into_buffer(&connection, hash, u64::MAX, PROGRESS_TIMEOUT, &mut reused).await?;
    Ok(MemoryRows {
        server: addr,
        connection,
        task,
        reused,
    })
}

/// A storage node's disk store holding the blob, served through the node's accept loop.
async fn file_rows(
    args: &Args,
    client: &HordeEndpoint,
    data: &Bytes,
    hash: horde_protocol::BlobHash,
) -> anyhow::Result<FileRows> {
    let work = tempfile::Builder::new()
        .prefix("blob-bench")
        .tempdir_in(args.json.parent().unwrap_or(Path::new(".")))
        .or_else(|_| tempfile::tempdir())?;
    let store = Arc::new(BlobStore::open(
        &work.path().join("store"),
        StoreLimits::default(),
    )?);
    let stored = {
        let store = Arc::clone(&store);
        let data = data.clone();
        tokio::task::spawn_blocking(move || store.insert(&data)).await??
    };
    if stored != hash {
        bail!("store computed another hash");
    }
    let endpoint = Arc::new(quic_endpoint(7)?);
    let storage = NodeAddr {
        hotkey: endpoint.hotkey(),
        addrs: vec![endpoint.local_addr()?],
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn(serve(endpoint, store, cancel.clone()));
    let connection = blob::connect(client, &storage).await?;
    Ok(FileRows {
        work,
        storage,
        connection,
        cancel,
        task,
    })
}

/// Prints the table and the resume figure, and writes the JSON.
fn report(
    args: &Args,
    results: &Results,
    resume: Option<&ResumeReport>,
    size: u64,
) -> anyhow::Result<()> {
    print_table(results, size, args.rounds);
    if let Some(resume) = resume {
        println!();
        println!(
            "resume: cut after {} of {} bytes verified, resumed from {}, fetched {} bytes after \
             the resume; re-sent beyond the missing part: {} bytes ({:.4}% of the blob; one \
             chunk group is {CHUNK_GROUP_LEN} bytes)",
            resume.verified_before_cut,
            resume.size,
            resume.resumed_from,
            resume.fetched_after_resume,
            resume.resent_beyond_missing,
            resume.resent_beyond_missing as f64 * 100.0 / resume.size as f64
        );
    }

    let json = serde_json::json!({
        "size_bytes": size,
        "rounds": args.rounds,
        "transfers": results.rows.iter().map(|(name, row)| row_json(results, name, row))
            .collect::<Vec<_>>(),
        "targets": TARGETS.iter().filter_map(|&(name, target)| {
            let ratio = ratio_of_medians(results, name)?;
            Some(serde_json::json!({
                "name": name,
                "ratio_of_medians_to_raw_quinn": ratio,
                "target": target,
                "met": ratio >= target,
            }))
        }).collect::<Vec<_>>(),
        "resume": resume.map(|resume| serde_json::json!({
            "verified_before_cut": resume.verified_before_cut,
            "resumed_from": resume.resumed_from,
            "fetched_after_resume": resume.fetched_after_resume,
            "resent_beyond_missing": resume.resent_beyond_missing,
            "chunk_group_bytes": CHUNK_GROUP_LEN,
        })),
    });
    if let Some(parent) = args.json.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    eprintln!("wrote {}", args.json.display());
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let size = args.size / CHUNK as u64 * CHUNK as u64;
    eprintln!(
        "blob-throughput: {size} bytes per transfer, 127.0.0.1, {} rounds",
        args.rounds
    );
    let chunk = Bytes::from(vec![0x5au8; CHUNK]);
    let data = Bytes::from(sample(size));
    let (blob, hash) = ServedBlob::from_memory(data.clone());
    let client = quic_endpoint(6)?;

    let mut memory = if args.runs("mem") {
        Some(memory_rows(&client, blob, hash).await?)
    } else {
        drop(blob);
        None
    };
    let files = if args.runs("file") {
        Some(file_rows(&args, &client, &data, hash).await?)
    } else {
        None
    };

    let mut results = Results::default();
    for round in 0..args.rounds {
        if args.runs("tcp") {
            let chunk = chunk.clone();
            let run = || async { tokio::task::spawn_blocking(move || tcp(size, &chunk)).await? };
            results.push(measure(TCP, round, size, run).await?);
        }
        if args.runs("tls") {
            let chunk = chunk.clone();
            let run = || async { tokio::task::spawn_blocking(move || tls(size, &chunk)).await? };
            results.push(measure(TLS, round, size, run).await?);
        }
        if args.runs("quinn") {
            results.push(measure(QUINN, round, size, || raw_quinn(size, &chunk, None)).await?);
            let mut received = Vec::new();
            let (chunk, slot) = (&chunk, &mut received);
            let fetch = move || async move { raw_quinn(size, chunk, Some(slot)).await };
            results.push(measure(QUINN_FRESH, round, size, fetch).await?);
            drop(received);
        }
        if let Some(memory) = &mut memory {
            // (d) memory → memory, verified, as a client fetches a blob into memory.
            let mut received = Bytes::new();
            let (client, server, slot) = (&client, &memory.server, &mut received);
            let fetch = move || async move {
                *slot = get_to_memory(
                    client,
                    server,
                    hash,
                    u64::MAX,
                    &TransferPolicy::default(),
                    &mut NoProgress,
                )
                .await?;
                Ok(())
            };
            results.push(measure(MEM, round, size, fetch).await?);
            if received != data {
                bail!("memory transfer delivered wrong bytes");
            }
            drop(received);
            // (d') the same into the buffer of an earlier transfer, emptied.
            let (connection, reused) = (&memory.connection, &mut memory.reused);
            reused.clear();
            let fetch = move || async move {
                get_into_buffer(connection, hash, u64::MAX, PROGRESS_TIMEOUT, reused).await?;
                Ok(())
            };
            results.push(measure(MEM_REUSED, round, size, fetch).await?);
            if memory.reused[..] != data[..] {
                bail!("memory transfer into the reused buffer delivered wrong bytes");
            }
        }
        if let Some(files) = &files {
            // (e) file → file from a storage node's disk store, verified, fsync included.
            let dest = files.work.path().join("get.out");
            let fetch = || async {
                get_to_file_once(
                    &files.connection,
                    hash,
                    &dest,
                    None,
                    u64::MAX,
                    PROGRESS_TIMEOUT,
                    &mut NoProgress,
                )
                .await?;
                Ok(())
            };
            results.push(measure(FILE, round, size, fetch).await?);
            std::fs::remove_file(&dest)?;
        }
    }
    drop(data);

    if let Some(memory) = memory {
        memory.task.abort();
    }
    let mut resume = None;
    if let Some(files) = files {
        resume =
            Some(resume_measurement(&client, &files.storage, hash, size, files.work.path()).await?);
        files.cancel.cancel();
        let _ = files.task.await;
    }

    report(&args, &results, resume.as_ref(), size)
}

/// A row's median rate over raw quinn's median rate.
fn ratio_of_medians(results: &Results, name: &str) -> Option<f64> {
    let quinn = results.row(QUINN)?.median_of(Measurement::gbits);
    Some(results.row(name)?.median_of(Measurement::gbits) / quinn)
}

/// A row's rate over raw quinn's in each round.
fn ratios_per_round(results: &Results, row: &Row) -> Vec<Option<f64>> {
    (0..row.rounds.len())
        .map(|round| Some(row.rounds[round].gbits() / results.quinn_in_round(round)?))
        .collect()
}

fn print_table(results: &Results, size: u64, rounds: usize) {
    println!();
    println!(
        "| transfer ({} MiB, 127.0.0.1), median of {rounds} rounds | Gbit/s | min–max | CPU s/GB \
         | page faults/GiB | vs raw quinn (medians) | vs raw quinn, each round |",
        size >> 20
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, row) in &results.rows {
        let (min, max) = row.range_of(Measurement::gbits);
        let ratio =
            ratio_of_medians(results, name).map_or_else(|| "—".to_owned(), |r| format!("{r:.2}×"));
        let per_round: Vec<String> = ratios_per_round(results, row)
            .into_iter()
            .map(|ratio| ratio.map_or_else(|| "—".to_owned(), |r| format!("{r:.2}")))
            .collect();
        println!(
            "| {name} | {:.2} | {min:.2}–{max:.2} | {:.2} | {:.0} | {ratio} | {} |",
            row.median_of(Measurement::gbits),
            row.median_of(Measurement::cpu_per_gb),
            row.median_of(Measurement::faults_per_gib),
            per_round.join(" / "),
        );
    }
    for (name, target) in TARGETS {
        let (Some(ratio), Some(row)) = (ratio_of_medians(results, name), results.row(name)) else {
            continue;
        };
        let met_rounds = ratios_per_round(results, row)
            .into_iter()
            .filter(|ratio| ratio.is_some_and(|ratio| ratio >= target))
            .count();
        println!(
            "{name}: {ratio:.2}× raw quinn (medians), target ≥ {target:.2}×: {}; met in {met_rounds} \
             of {} rounds",
            if ratio >= target { "met" } else { "NOT met" },
            row.rounds.len()
        );
    }
}

fn row_json(results: &Results, name: &str, row: &Row) -> serde_json::Value {
    let (min, max) = row.range_of(Measurement::gbits);
    serde_json::json!({
        "name": name,
        "median_gbit_per_s": row.median_of(Measurement::gbits),
        "min_gbit_per_s": min,
        "max_gbit_per_s": max,
        "median_cpu_seconds_per_gb": row.median_of(Measurement::cpu_per_gb),
        "median_page_faults_per_gib": row.median_of(Measurement::faults_per_gib),
        "ratio_of_medians_to_raw_quinn": ratio_of_medians(results, name),
        "rounds": row.rounds.iter().zip(ratios_per_round(results, row)).map(|(m, ratio)| {
            serde_json::json!({
                "seconds": m.seconds,
                "gbit_per_s": m.gbits(),
                "cpu_seconds_per_gb": m.cpu_per_gb(),
                "page_faults_per_gib": m.faults_per_gib(),
                "ratio_to_raw_quinn_same_round": ratio,
            })
        }).collect::<Vec<_>>(),
    })
}
