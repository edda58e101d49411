//! Discovery at scale: starts a testnet of real `horde node` processes (default 1 facilitator,
//! 3 validators, 30 miners; up to 256 nodes), all joining through the facilitator with
//! `--bootstrap`, and reports
//!
//! - convergence: time from spawning the nodes until the facilitator knows every node and every
//!   validator knows every miner (and the part of it after the last node logged its start);
//! - a job through the converged network (submit → verified endpoint), to show it is usable;
//! - over an idle window: resident memory and CPU of every node, per role, the whole network's
//!   CPU, and the gossip counters the nodes log (records published per second network-wide,
//!   messages received / accepted / ignored / rejected, whole-directory fetches).
//!
//! `cargo run --release -p horde-benches --bin discovery-scale -- [--validators N] [--miners N]
//! [--idle-secs S] [--json PATH]`; 256 nodes: `--validators 16 --miners 239`.

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
    /// Seconds of the idle window (memory is read at its end, CPU and counters over it; records
    /// are re-signed every 48 s, so a window shorter than that sees few of them).
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/discovery-scale.json")]
    json: String,
}

/// Most nodes one run may start (a subnet's 256 slots).
const MAX_NODES: usize = 256;
/// Clock ticks per second of `/proc/PID/stat` CPU times (`getconf CLK_TCK`, 100 on Linux).
const CLK_TCK: f64 = 100.0;
/// How many gossip counters a node logs (see `GOSSIP_FIELDS`).
const FIELDS: usize = 7;
/// The counters of a node's `gossip counters` log line, in order.
const GOSSIP_FIELDS: [&str; FIELDS] = [
    "received",
    "accepted",
    "ignored",
    "rejected",
    "published",
    "fetches_sent",
    "fetches_served",
];

/// min / median / max of one figure over the nodes of a role.
struct RoleSpread {
    role: Role,
    count: usize,
    min: f64,
    median: f64,
    max: f64,
}

fn spread_by_role(
    testnet: &Testnet,
    value: impl Fn(&str) -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<RoleSpread>> {
    let mut out = Vec::new();
    for role in [Role::Facilitator, Role::Validator, Role::Miner] {
        let mut values = Vec::new();
        for node in testnet.nodes().iter().filter(|n| n.role == role) {
            values.push(value(&node.name)?);
        }
        if values.is_empty() {
            continue;
        }
        values.sort_by(f64::total_cmp);
        out.push(RoleSpread {
            role,
            count: values.len(),
            min: values[0],
            median: values[values.len() / 2],
            max: values[values.len() - 1],
        });
    }
    Ok(out)
}

fn print_spread(title: &str, spread: &[RoleSpread]) {
    println!("== {title}");
    println!(
        "  {:<12} {:>5} {:>8} {:>8} {:>8}",
        "role", "nodes", "min", "median", "max"
    );
    for m in spread {
        println!(
            "  {:<12} {:>5} {:>8.2} {:>8.2} {:>8.2}",
            m.role.to_string(),
            m.count,
            m.min,
            m.median,
            m.max
        );
    }
}

fn spread_json(spread: &[RoleSpread]) -> serde_json::Value {
    spread
        .iter()
        .map(|m| {
            serde_json::json!({
                "role": m.role.to_string(), "nodes": m.count,
                "min": m.min, "median": m.median, "max": m.max,
            })
        })
        .collect()
}

/// The node process (not its executors) of every node, by name: `horde node --config
/// DIR/NAME/node.toml`.
fn node_pids(testnet: &Testnet) -> std::collections::HashMap<String, u32> {
    let processes = testnet.node_processes();
    let mut pids = std::collections::HashMap::new();
    for node in testnet.nodes() {
        let config = node.config.display().to_string();
        if let Some((pid, _)) = processes
            .iter()
            .find(|(_, cmdline)| cmdline.contains(" node ") && cmdline.contains(&config))
        {
            pids.insert(node.name.clone(), *pid);
        }
    }
    pids
}

/// CPU time (user + system, seconds) of a process so far.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("no ) in stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state.
    let ticks: f64 = fields.get(11).context("no utime")?.parse::<f64>()?
        + fields.get(12).context("no stime")?.parse::<f64>()?;
    Ok(ticks / CLK_TCK)
}

/// The last `gossip counters` line of a node's log, as numbers in `GOSSIP_FIELDS` order.
fn gossip_counters(log: &str) -> [u64; FIELDS] {
    let mut counters = [0; FIELDS];
    if let Some(line) = log.lines().rev().find(|l| l.contains("gossip counters")) {
        for (i, field) in GOSSIP_FIELDS.iter().enumerate() {
            let key = format!("{field}=");
            counters[i] = line
                .split_whitespace()
                .find_map(|word| word.strip_prefix(&key))
                .and_then(|v| v.trim_end_matches(',').parse().ok())
                .unwrap_or(0);
        }
    }
    counters
}

fn network_counters(testnet: &Testnet) -> [u64; FIELDS] {
    let mut total = [0; FIELDS];
    for node in testnet.nodes() {
        for (sum, value) in total
            .iter_mut()
            .zip(gossip_counters(&testnet.log(&node.name)))
        {
            *sum += value;
        }
    }
    total
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    anyhow::ensure!(
        1 + args.validators + args.miners <= MAX_NODES,
        "at most {MAX_NODES} nodes (1 facilitator + validators + miners)"
    );
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
        // The nodes' gossip counters are logged at debug, every 5 s.
        log_filter: "warn,horde_node::server::discovery::stats=debug".to_owned(),
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
    // The idle window: CPU and counters at both ends (counters are logged every 5 s, so both
    // ends are read just after a fresh line).
    let pids = node_pids(&testnet);
    anyhow::ensure!(
        pids.len() == nodes,
        "found {} of {nodes} node processes",
        pids.len()
    );
    std::thread::sleep(Duration::from_secs(6));
    let cpu_start: Vec<(String, f64)> = pids
        .iter()
        .map(|(name, pid)| Ok((name.clone(), cpu_secs(*pid)?)))
        .collect::<anyhow::Result<_>>()?;
    let counters_start = network_counters(&testnet);
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let counters_end = network_counters(&testnet);
    let secs = window.elapsed().as_secs_f64();
    let mut cpu_pct = std::collections::HashMap::new();
    for (name, start) in &cpu_start {
        let used = cpu_secs(pids[name])? - start;
        cpu_pct.insert(name.clone(), used / secs * 100.0);
    }
    let network_cpu: f64 = cpu_pct.values().sum();
    let memory = spread_by_role(&testnet, |name| Ok(testnet.rss_kib(name)? as f64 / 1024.0))?;
    let cpu = spread_by_role(&testnet, |name| {
        cpu_pct.get(name).copied().context("no CPU figure")
    })?;
    print_spread(
        &format!("resident memory after {secs:.0} s idle (MiB)"),
        &memory,
    );
    print_spread(&format!("CPU over {secs:.0} s idle (% of one core)"), &cpu);
    let delta: Vec<f64> = counters_end
        .iter()
        .zip(counters_start)
        .map(|(end, start)| end.saturating_sub(start) as f64)
        .collect();
    let per_sec = |i: usize| delta[i] / secs;
    println!(
        "== gossip at idle, {nodes} nodes, {secs:.0} s window (whole network, from the nodes' counters)"
    );
    println!(
        "  records published: {:.2}/s; messages received {:.1}/s ({:.2}/s per node): accepted {:.1}/s (= signature checks that kept a record), ignored {:.1}/s, rejected {:.1}/s",
        per_sec(4),
        per_sec(0),
        per_sec(0) / nodes as f64,
        per_sec(1),
        per_sec(2),
        per_sec(3)
    );
    println!(
        "  whole-directory fetches: {:.0} sent, {:.0} served; network idle CPU {network_cpu:.1}% of one core",
        delta[5], delta[6]
    );
    println!(
        "  totals since start: {}",
        GOSSIP_FIELDS
            .iter()
            .zip(counters_end)
            .map(|(f, v)| format!("{f} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let worst = memory.iter().map(|m| m.max).fold(0.0, f64::max);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "  targets (issue 17, 256 nodes): convergence <= 10000 ms: {}; idle RSS <= 25 MiB (worst node {worst:.1}): {}; network idle CPU <= 10% of a core: {}",
        met(converged <= Duration::from_secs(10)),
        met(worst <= 25.0),
        met(network_cpu <= 10.0)
    );
    let json = serde_json::json!({
        "nodes": nodes,
        "validators": args.validators,
        "miners": args.miners,
        "converged_ms": converged.as_secs_f64() * 1e3,
        "all_started_ms": testnet.started_in().as_secs_f64() * 1e3,
        "job_endpoint_ms": job_ms,
        "idle_secs": secs,
        "rss_mib": spread_json(&memory),
        "cpu_pct": spread_json(&cpu),
        "network_idle_cpu_pct": network_cpu,
        "gossip_per_sec": GOSSIP_FIELDS.iter().enumerate().map(|(i, f)| (f.to_string(), serde_json::json!(per_sec(i)))).collect::<serde_json::Map<_, _>>(),
        "gossip_totals": GOSSIP_FIELDS.iter().zip(counters_end).map(|(f, v)| (f.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    println!("  (json: {})", args.json);
    testnet.shutdown();
    Ok(())
}
