//! One request per process: how long `horde job request` and `horde blob get` hold the user,
//! spawn to exit, beside the cost of starting the same binary at all (`horde --version`), in
//! alternating rounds on a local testnet.
//!
//! `oneshot-latency [--requests 20]` (set `HORDE_BIN` / `HORDE_DEMO_JOB_BIN` to skip the
//! nested build of binaries just built). Every answer is checked: the request's body and its
//! "receipt verified" line, the blob's bytes. What the commands add beyond starting a process
//! is the connection, the exchange and the close; since the close no longer waits out QUIC's
//! draining period (≥ 75 ms: three probe timeouts with the 25 ms maximum ACK delay), the
//! difference should be a few milliseconds.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{Context as _, bail};
use horde_benches::median;
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary, horde_binary};

/// One request per process, `horde job request` and `horde blob get` beside `horde --version`.
#[derive(Debug, clap::Parser)]
#[command(name = "oneshot-latency")]
struct Args {
    /// Processes of each kind, alternating.
    #[arg(long, default_value_t = 20)]
    requests: usize,
}

fn run(horde: &Path, state: &Path, args: &[&str]) -> anyhow::Result<(f64, Output)> {
    let start = Instant::now();
    let output = Command::new(horde)
        .args(args)
        .env("HORDE_STATE_DIR", state)
        .output()
        .with_context(|| format!("horde {}", args.join(" ")))?;
    let millis = start.elapsed().as_secs_f64() * 1e3;
    if !output.status.success() {
        bail!(
            "horde {}: {}\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((millis, output))
}

/// Runs the demo job; returns its id once its endpoint verified.
fn start_job(horde: &Path, state: &Path, facilitator: &str) -> anyhow::Result<String> {
    let spec = state.join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "executor_class = \"cpu\"\nprogram = \"{}\"\nreadiness_http = \"/health\"\n",
            demo_job_binary()?.display()
        ),
    )?;
    let spec = spec.to_string_lossy();
    let args = ["job", "run", "--spec", &spec, "--facilitator", facilitator];
    let (_, output) = run(horde, state, &args)?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    text.lines()
        .find_map(|line| line.strip_prefix("job "))
        .map(|id| id.trim().to_owned())
        .with_context(|| format!("no job id in {text}"))
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let horde = horde_binary()?;
    let testnet = Testnet::start(TestnetConfig::default())?;
    let state = tempfile::tempdir()?;
    let job = start_job(&horde, state.path(), &testnet.facilitator().to_string())?;
    let storage = testnet
        .storage()
        .context("the testnet has no storage node")?;
    let blob_file = state.path().join("blob.in");
    std::fs::write(&blob_file, vec![0x42u8; 1 << 20])?;
    let (_, put) = run(
        &horde,
        state.path(),
        &[
            "blob",
            "put",
            &blob_file.to_string_lossy(),
            "--storage",
            &storage.to_string(),
        ],
    )?;
    let hash = String::from_utf8_lossy(&put.stdout).trim().to_owned();
    let blob_out = state.path().join("blob.out");

    let (mut start, mut request, mut get) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.requests {
        start.push(run(&horde, state.path(), &["--version"])?.0);
        let echo = [
            "job", "request", &job, "POST", "/echo", "--data", "one shot",
        ];
        let (millis, output) = run(&horde, state.path(), &echo)?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        if !stdout.contains("one shot") || !stderr.contains("receipt verified") {
            bail!("incomplete answer: {stdout}\n{stderr}");
        }
        request.push(millis);
        let out = blob_out.to_string_lossy();
        let storage = storage.to_string();
        let fetch = ["blob", "get", &hash, "--out", &out, "--storage", &storage];
        get.push(run(&horde, state.path(), &fetch)?.0);
        if std::fs::read(&blob_out)? != std::fs::read(&blob_file)? {
            bail!("horde blob get delivered other bytes");
        }
        std::fs::remove_file(&blob_out)?;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let floor = median(start);
    println!(
        "== one request per process, spawn to exit, median of {} (load average {})",
        args.requests,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("  horde --version (process start)    {floor:8.2} ms");
    for (name, values) in [
        ("horde job request POST /echo", request),
        ("horde blob get (1 MiB)", get),
    ] {
        let value = median(values);
        println!(
            "  {name:<34} {value:8.2} ms  (+{:.2} ms over the process start)",
            value - floor
        );
    }
    Ok(())
}
