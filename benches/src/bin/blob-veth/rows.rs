//! One transfer of each row, measured from outside: wall time (spawn to exit for a command),
//! the rate counting the flush to disk, CPU seconds of both ends and their peak resident sets;
//! on the veth pair (client in the client namespace) or on loopback (client in the server
//! namespace: traffic to an address of one's own namespace goes through its `lo`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context as _, bail};
use horde_node::client::blob::{TransferPolicy, get_to_file};
use horde_node::client::progress::NoProgress;
use horde_protocol::{BlobHash, NodeAddr, SecretKey};
use horde_transport::{ALPN_BLOB, EndpointConfig, HordeEndpoint};

use crate::servers::{self, HTTP_PORT, HTTPS_PORT, cpu_seconds, peak_rss_kib, reset_peak_rss};
use horde_benches::netns::{SERVER_IP, VethPair};

/// GNU time, for a command's CPU time and peak resident set (from `wait4`).
pub(crate) const GNU_TIME: &str = "/usr/bin/time";

/// The rows, in the order each round runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Row {
    /// `get_to_file` (the CLI's own call) from a long-running process in the client namespace.
    InProcess,
    /// The `horde blob get` command.
    Cli,
    /// `curl` ← nginx over HTTPS (TLS 1.3), plus `b3sum` of the received file.
    Https,
    /// `curl` ← nginx over HTTP, plus `b3sum` of the received file.
    Http,
    /// `sendme receive` (iroh-blobs, which verifies BLAKE3 as it receives) from a `sendme send`
    /// of the same file in the server namespace.
    Sendme,
}

impl Row {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::InProcess => "horde get, in process (get_to_file)",
            Self::Cli => "`horde blob get` (CLI)",
            Self::Https => "curl ← nginx, HTTPS TLS 1.3 (+ b3sum)",
            Self::Http => "curl ← nginx, HTTP (+ b3sum)",
            Self::Sendme => "sendme receive ← sendme send (iroh-blobs)",
        }
    }
}

/// The path a round's transfers take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Over the veth pair at this MTU: clients in the client namespace.
    Veth(u32),
    /// Over loopback: clients in the server namespace, to the same server addresses (an address
    /// of one's own namespace is reached through `lo`, MTU 65,536), so TCP moves 64 KiB
    /// segments while QUIC still sends datagrams of at most what its MTU discovery found.
    Loopback,
}

impl Route {
    pub(crate) fn name(self) -> String {
        match self {
            Self::Veth(mtu) => format!("MTU {mtu}"),
            Self::Loopback => "loopback".to_owned(),
        }
    }

    /// The namespace clients of this route run in.
    fn client_namespace(self, setup: &Setup) -> &str {
        match self {
            Self::Veth(_) => &setup.pair.client,
            Self::Loopback => &setup.pair.server,
        }
    }
}

/// One transfer.
#[derive(Debug, Clone)]
pub(crate) struct Measurement {
    pub(crate) bytes: u64,
    /// Start to the file complete (horde: verified, fsynced, renamed; curl: written).
    pub(crate) seconds: f64,
    /// The same plus what curl's file still needed to reach the disk (`fsync` after it exits);
    /// horde's rows fsync before they finish, so for them it is `seconds`.
    pub(crate) flushed_seconds: f64,
    /// CPU seconds of the client (for curl, with `b3sum`'s).
    pub(crate) client_cpu: f64,
    /// CPU seconds of the server process.
    pub(crate) server_cpu: f64,
    /// Peak resident set of the client, KiB.
    pub(crate) client_rss_kib: f64,
    /// Peak resident set of the server process during the transfer, KiB.
    pub(crate) server_rss_kib: f64,
}

impl Measurement {
    pub(crate) fn gbits(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }

    pub(crate) fn flushed_gbits(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.flushed_seconds / 1e9
    }

    fn gib(&self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 30)
    }

    pub(crate) fn client_cpu_per_gib(&self) -> f64 {
        self.client_cpu / self.gib()
    }

    pub(crate) fn server_cpu_per_gib(&self) -> f64 {
        self.server_cpu / self.gib()
    }

    pub(crate) fn cpu_per_gib(&self) -> f64 {
        (self.client_cpu + self.server_cpu) / self.gib()
    }
}

/// What a command cost, as GNU time reports it.
#[derive(Debug, Clone, Copy)]
struct CommandUsage {
    wall: f64,
    cpu: f64,
    rss_kib: f64,
}

/// Runs `program ARGS` in `namespace` under GNU time (in directory `cwd` if given; `scratch`
/// must then be absolute); fails if it fails.
fn run_timed(
    namespace: &str,
    cwd: Option<&Path>,
    program: &Path,
    args: &[&str],
    scratch: &Path,
) -> anyhow::Result<(CommandUsage, String)> {
    let usage_file = scratch.join("usage.txt");
    let mut command = VethPair::command(namespace, Path::new(GNU_TIME));
    command
        .args(["-f", "%U %S %M", "-o"])
        .arg(&usage_file)
        .arg(program)
        .args(args)
        .stdin(Stdio::null());
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let start = Instant::now();
    let output = command
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    let wall = start.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "{} {}: {}\n{}",
            program.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let report = std::fs::read_to_string(&usage_file)?;
    let numbers: Vec<f64> = report
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    let [user, system, rss_kib] = numbers[..] else {
        bail!("GNU time wrote {report:?}");
    };
    let usage = CommandUsage {
        wall,
        cpu: user + system,
        rss_kib,
    };
    Ok((usage, String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// What every row needs.
#[derive(Debug)]
pub(crate) struct Setup {
    pub(crate) pair: VethPair,
    pub(crate) horde: PathBuf,
    pub(crate) work: PathBuf,
    pub(crate) size: u64,
    pub(crate) hash: BlobHash,
    pub(crate) storage: NodeAddr,
    pub(crate) storage_pid: u32,
    /// nginx's process and the certificate curl trusts, when nginx is installed.
    pub(crate) nginx: Option<(u32, PathBuf)>,
    /// `sendme send`'s process and its ticket, when sendme is on PATH.
    pub(crate) sendme: Option<(u32, String)>,
    /// The runtime whose threads live in the client namespace (the in-process row on veth).
    pub(crate) client_runtime: tokio::runtime::Runtime,
    /// The runtime whose threads live in the server namespace (the in-process row on loopback).
    pub(crate) server_runtime: tokio::runtime::Runtime,
}

/// Measures `row` once on `route`; the received file is removed afterwards.
pub(crate) fn measure(setup: &Setup, route: Route, row: Row) -> anyhow::Result<Measurement> {
    let out = setup.work.join("received.bin");
    let _ = std::fs::remove_file(&out);
    let server_pid = match row {
        Row::InProcess | Row::Cli => setup.storage_pid,
        Row::Https | Row::Http => match &setup.nginx {
            Some((pid, _)) => *pid,
            None => bail!("nginx is not running"),
        },
        Row::Sendme => match &setup.sendme {
            Some((pid, _)) => *pid,
            None => bail!("sendme send is not running"),
        },
    };
    reset_peak_rss(server_pid);
    let server_before = cpu_seconds(server_pid);
    let namespace = route.client_namespace(setup);
    let mut measurement = match row {
        Row::InProcess => in_process(setup, route, &out)?,
        Row::Cli => cli(setup, namespace, &out)?,
        Row::Https | Row::Http => curl(setup, namespace, row, &out)?,
        Row::Sendme => sendme(setup, namespace, &out)?,
    };
    measurement.server_cpu = cpu_seconds(server_pid) - server_before;
    measurement.server_rss_kib = peak_rss_kib(server_pid);
    // horde renames the file into place only once every byte verified; curl's was hashed.
    let len = std::fs::metadata(&out)
        .with_context(|| format!("{} left no file", row.name()))?
        .len();
    if len != setup.size {
        bail!(
            "{}: received {len} bytes, expected {}",
            row.name(),
            setup.size
        );
    }
    std::fs::remove_file(&out)?;
    Ok(measurement)
}

fn in_process(setup: &Setup, route: Route, out: &Path) -> anyhow::Result<Measurement> {
    let runtime = match route {
        Route::Veth(_) => &setup.client_runtime,
        Route::Loopback => &setup.server_runtime,
    };
    let me = std::process::id();
    reset_peak_rss(me);
    let cpu_before = cpu_seconds(me);
    let (storage, hash, dest) = (setup.storage.clone(), setup.hash, out.to_owned());
    let start = Instant::now();
    // Spawned (not `block_on`, which would run on this thread, outside the namespace): the
    // endpoint's socket is made on a worker thread, inside it.
    let task = runtime.spawn(async move {
        let bind = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        let endpoint = HordeEndpoint::bind(
            &SecretKey::generate(),
            EndpointConfig::new(bind, &[ALPN_BLOB]),
        )?;
        let policy = TransferPolicy::default();
        let max = horde_protocol::blob::DEFAULT_MAX_BLOB_SIZE;
        let outcome = get_to_file(
            &endpoint,
            &storage,
            hash,
            &dest,
            None,
            max,
            &policy,
            &mut NoProgress,
        )
        .await;
        horde_transport::close_endpoint_promptly(&endpoint, horde_transport::codes::SHUTDOWN, b"")
            .await;
        anyhow::Ok(outcome?)
    });
    runtime.block_on(task)??;
    let seconds = start.elapsed().as_secs_f64();
    Ok(Measurement {
        bytes: setup.size,
        seconds,
        flushed_seconds: seconds,
        client_cpu: cpu_seconds(me) - cpu_before,
        server_cpu: 0.0,
        client_rss_kib: peak_rss_kib(me),
        server_rss_kib: 0.0,
    })
}

fn cli(setup: &Setup, namespace: &str, out: &Path) -> anyhow::Result<Measurement> {
    let (hash, storage, out) = (
        setup.hash.to_string(),
        setup.storage.to_string(),
        out.to_string_lossy(),
    );
    let args = ["blob", "get", &hash, "--out", &out, "--storage", &storage];
    let (usage, _) = run_timed(namespace, None, &setup.horde, &args, &setup.work)?;
    Ok(Measurement {
        bytes: setup.size,
        seconds: usage.wall,
        flushed_seconds: usage.wall,
        client_cpu: usage.cpu,
        server_cpu: 0.0,
        client_rss_kib: usage.rss_kib,
        server_rss_kib: 0.0,
    })
}

fn curl(setup: &Setup, namespace: &str, row: Row, out: &Path) -> anyhow::Result<Measurement> {
    let Some((_, cert)) = &setup.nginx else {
        bail!("nginx is not running");
    };
    let url = match row {
        Row::Https => format!("https://{SERVER_IP}:{HTTPS_PORT}/{}", servers::BLOB_FILE),
        _ => format!("http://{SERVER_IP}:{HTTP_PORT}/{}", servers::BLOB_FILE),
    };
    let (cert, out_text) = (cert.to_string_lossy(), out.to_string_lossy());
    let args = [
        "-sS",
        "--fail",
        "--tlsv1.3",
        "--cacert",
        &cert,
        "-o",
        &out_text,
        &url,
    ];
    let (usage, _) = run_timed(namespace, None, Path::new("curl"), &args, &setup.work)?;
    // What the page cache still held of the file: written out as horde's rows write theirs.
    let flush_start = Instant::now();
    std::fs::File::open(out)?.sync_all()?;
    let flush = flush_start.elapsed().as_secs_f64();
    // The hash horde computes while receiving, computed here after the fact.
    let (hashing, printed) = run_timed(
        namespace,
        None,
        Path::new("b3sum"),
        &["--no-names", &out_text],
        &setup.work,
    )?;
    if printed.trim() != setup.hash.to_string() {
        bail!(
            "{}: b3sum {} is not the blob's hash",
            row.name(),
            printed.trim()
        );
    }
    Ok(Measurement {
        bytes: setup.size,
        seconds: usage.wall,
        flushed_seconds: usage.wall + flush,
        client_cpu: usage.cpu + hashing.cpu,
        server_cpu: 0.0,
        client_rss_kib: usage.rss_kib,
        server_rss_kib: 0.0,
    })
}

/// `sendme receive TICKET` in a directory of its own (it writes the file, named as sent, into
/// its working directory, through a `.sendme-*` directory there); the file is then moved to
/// `out`. sendme does not fsync: like curl's, its file's flush is timed after it exits.
fn sendme(setup: &Setup, namespace: &str, out: &Path) -> anyhow::Result<Measurement> {
    let Some((_, ticket)) = &setup.sendme else {
        bail!("sendme send is not running");
    };
    let dir = setup.work.join("sendme-receive");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (usage, _) = run_timed(
        namespace,
        Some(&dir),
        Path::new("sendme"),
        &["receive", "--relay", "disabled", "--no-progress", ticket],
        &setup.work,
    )?;
    let received = dir.join(servers::BLOB_FILE);
    let flush_start = Instant::now();
    std::fs::File::open(&received)
        .with_context(|| format!("sendme left no {}", received.display()))?
        .sync_all()?;
    let flush = flush_start.elapsed().as_secs_f64();
    std::fs::rename(&received, out)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(Measurement {
        bytes: setup.size,
        seconds: usage.wall,
        flushed_seconds: usage.wall + flush,
        client_cpu: usage.cpu,
        server_cpu: 0.0,
        client_rss_kib: usage.rss_kib,
        server_rss_kib: 0.0,
    })
}
