//! Discovery at scale: starts a testnet of real `horde node` processes (default 1 facilitator,
//! 3 validators, 30 miners), all joining through the facilitator with `--bootstrap`, and reports
//!
//! - convergence: time from spawning the nodes until the facilitator knows every node and every
//!   validator knows every miner (and the part of it after the last node logged its start);
//! - resident memory of every node after it has been idle for a while, per role;
//! - a job through the converged network (submit → verified endpoint), to show it is usable.
//!
//! `cargo run --release -p horde-benches --bin discovery-scale -- [--validators N] [--miners N]
//! [--idle-secs S] [--json PATH]`

use std::time::{Duration, Instant};

use anyhow::Context as _;
use horde_node::client::{Client, JobRequest};
use horde_protocol::{Role, SecretKey};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};

/// Convergence and memory of a local network of `horde node` processes joining through one
/// bootstrap peer.
#[derive(Debug, clap::Parser)]
#[command(name = "discovery-scale")]
struct Args {
    /// Validators.
    #[arg(long, default_value_t = 3)]
    validators: usize,
    /// Miners.
    #[arg(long, default_value_t = 30)]
    miners: usize,
    /// Seconds of idle before memory is read.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/discovery-scale.json")]
    json: String,
}

struct RoleMemory {
    role: Role,
    count: usize,
    min_mib: f64,
    median_mib: f64,
    max_mib: f64,
}

fn memory_by_role(testnet: &Testnet) -> anyhow::Result<Vec<RoleMemory>> {
    let mut out = Vec::new();
    for role in [Role::Facilitator, Role::Validator, Role::Miner] {
        let mut values = Vec::new();
        for node in testnet.nodes().iter().filter(|n| n.role == role) {
            values.push(testnet.rss_kib(&node.name)? as f64 / 1024.0);
        }
        if values.is_empty() {
            continue;
        }
        values.sort_by(f64::total_cmp);
        out.push(RoleMemory {
            role,
            count: values.len(),
            min_mib: values[0],
            median_mib: values[values.len() / 2],
            max_mib: values[values.len() - 1],
        });
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let program = demo_job_binary()?;
    let started = Instant::now();
    let testnet = Testnet::start(TestnetConfig {
        validators: args.validators,
        miners: args.miners,
        executors_per_miner: 1,
        // No executor processes: the memory measured is the nodes' own.
        prewarm: 0,
        storage: 0,
        log_filter: "warn".to_owned(),
        converge_timeout: Duration::from_secs(120),
        ..TestnetConfig::default()
    })?;
    let converged = testnet.converged_in().context("discovery did not run")?;
    let total = started.elapsed();
    let nodes = testnet.nodes().len();
    println!(
        "== discovery: {nodes} nodes (1 facilitator, {} validators, {} miners), one machine",
        args.validators, args.miners
    );
    println!(
        "  converged {:.0} ms after spawning the nodes (start-up of {nodes} processes included)",
        converged.as_secs_f64() * 1e3
    );
    println!(
        "  of which {:.0} ms until every node had logged its start, {:.0} ms after that",
        testnet.started_in().as_secs_f64() * 1e3,
        converged.saturating_sub(testnet.started_in()).as_secs_f64() * 1e3
    );
    println!(
        "  harness total (build check, keys, configs, spawn, converge): {:.0} ms",
        total.as_secs_f64() * 1e3
    );
    let request = JobRequest::command("cpu", program.to_str().context("utf-8 path")?);
    let job_ms = runtime.block_on(async {
        let client = Client::new(SecretKey::generate(), testnet.facilitator())?;
        let submitted = Instant::now();
        let mut job = client.submit(&request).await?;
        job.wait_for_endpoint().await?;
        let ms = submitted.elapsed().as_secs_f64() * 1e3;
        job.terminate().await?;
        job.wait_for_end().await?;
        anyhow::Ok(ms)
    })?;
    println!(
        "  a job through the converged network: endpoint verified in {job_ms:.0} ms (executor spawned on demand)"
    );
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let memory = memory_by_role(&testnet)?;
    println!("== resident memory after {} s idle (MiB)", args.idle_secs);
    println!(
        "  {:<12} {:>5} {:>8} {:>8} {:>8}",
        "role", "nodes", "min", "median", "max"
    );
    for m in &memory {
        println!(
            "  {:<12} {:>5} {:>8.1} {:>8.1} {:>8.1}",
            m.role.to_string(),
            m.count,
            m.min_mib,
            m.median_mib,
            m.max_mib
        );
    }
    let worst = memory.iter().map(|m| m.max_mib).fold(0.0, f64::max);
    println!(
        "  targets: convergence <= 5000 ms: {}; idle RSS <= 30 MiB (worst node {worst:.1}): {}",
        if converged <= Duration::from_secs(5) {
            "met"
        } else {
            "NOT met"
        },
        if worst <= 30.0 { "met" } else { "NOT met" }
    );
    let json = serde_json::json!({
        "nodes": nodes,
        "validators": args.validators,
        "miners": args.miners,
        "converged_ms": converged.as_secs_f64() * 1e3,
        "all_started_ms": testnet.started_in().as_secs_f64() * 1e3,
        "job_endpoint_ms": job_ms,
        "idle_secs": args.idle_secs,
        "rss_mib": memory.iter().map(|m| serde_json::json!({
            "role": m.role.to_string(), "nodes": m.count,
            "min": m.min_mib, "median": m.median_mib, "max": m.max_mib,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    println!("  (json: {})", args.json);
    testnet.shutdown();
    Ok(())
}
