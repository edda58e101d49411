//! Discovery at scale: starts a testnet of real `horde node` processes (default 1 facilitator,
//! 3 validators, 30 miners; up to 256 nodes), all joining through the facilitator with
//! `--bootstrap` (or, with `--join-through-validators`, the miners through the validators), and
//! reports
//!
//! - convergence: time from spawning the nodes until the facilitator knows every node and every
//!   validator knows every miner (and the part of it after the last node logged its start);
//! - a job through the converged network (submit → verified endpoint), to show it is usable;
//! - capacity-change latency: `--jobs` concurrent jobs take and free miners' executors; each
//!   change is coalesced on its miner (change → signed record, from the miners' logs) and travels
//!   to the facilitator (signed → kept, from its log; a record's `seq` is its signing time in ms,
//!   one clock on one machine); p50/p99 of both and of record updates in general;
//! - over an idle window: resident memory and CPU of every node, per role, the whole network's
//!   CPU, and the gossip counters the nodes log (records published per second network-wide,
//!   messages received / accepted / ignored / rejected, whole-directory fetches), and the bytes
//!   on the loopback interface per node (all of the nodes' traffic, headers and ACKs included;
//!   the whole window, its median second and its busiest).
//!
//! `cargo run --release -p horde-benches --bin discovery-scale -- [--validators N] [--miners N]
//! [--idle-secs S] [--json PATH]`; 256 nodes: `--validators 16 --miners 239`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use horde_benches::{cpu_secs, latency_summary, load_average, loopback_bytes};
use horde_node::client::{Client, JobRequest};
use horde_protocol::{Role, SecretKey};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};

/// Convergence and memory of a local network of `horde node` processes joining by discovery.
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
    /// are re-signed every 90 s, so a window shorter than that sees few of them).
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Concurrent jobs run for the capacity-change latency (each changes a miner's capacity
    /// twice: taken, freed).
    #[arg(long, default_value_t = 8)]
    jobs: usize,
    /// Further `RUST_LOG` directives for the nodes (e.g. `horde_node::server::discovery=debug`),
    /// appended to the bench's own.
    #[arg(long, default_value = "")]
    log: String,
    /// Keep the network's directory (keys, configs, node logs) here instead of a temporary one.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// The validators join through the facilitator and start first; each miner then joins
    /// through one validator (in turn) instead of the facilitator: a subnet's miners know its
    /// validators, and the facilitator is then not the bootstrap peer of every node.
    #[arg(long)]
    join_through_validators: bool,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/discovery-scale.json")]
    json: String,
}

/// Most nodes one run may start (a subnet's 256 slots).
const MAX_NODES: usize = 256;
/// How many gossip counters a node logs (see `GOSSIP_FIELDS`).
const FIELDS: usize = 8;
/// The longest wait for the start-up's pull syncs to end before the idle window.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// Positions of the counters in [`GOSSIP_FIELDS`] (and in every array of counters read here).
const RECEIVED: usize = 0;
const ACCEPTED: usize = 1;
const IGNORED: usize = 2;
const REJECTED: usize = 3;
const PUBLISHED: usize = 4;
const FETCHES_SENT: usize = 5;
const FETCHES_SERVED: usize = 6;
const RECEIVED_BYTES: usize = 7;
/// The counters of a node's `gossip counters` log line, in order.
const GOSSIP_FIELDS: [&str; FIELDS] = [
    "received",
    "accepted",
    "ignored",
    "rejected",
    "published",
    "fetches_sent",
    "fetches_served",
    "received_bytes",
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

/// The values of `field=` in the lines of `log` that contain `message`.
fn log_values(log: &str, message: &str, field: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| field_value(l, field))
        .collect()
}

/// The number after `field=` in a log line.
fn field_value(line: &str, field: &str) -> Option<f64> {
    let key = format!("{field}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&key))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
}

/// Every node's log length now (the job phase is read from there on).
fn log_marks(testnet: &Testnet) -> std::collections::HashMap<String, usize> {
    testnet
        .nodes()
        .iter()
        .map(|n| (n.name.clone(), testnet.log(&n.name).len()))
        .collect()
}

/// What a node logged after `marks` were taken.
fn log_since(
    testnet: &Testnet,
    marks: &std::collections::HashMap<String, usize>,
    name: &str,
) -> String {
    let log = testnet.log(name);
    let from = marks.get(name).copied().unwrap_or(0).min(log.len());
    log.get(from..).unwrap_or_default().to_owned()
}

/// Capacity-change latency over the job phase (logs from `marks` on), printed and as JSON.
fn capacity_latency(
    testnet: &Testnet,
    marks: &std::collections::HashMap<String, usize>,
    jobs: usize,
    phase: &str,
) -> anyhow::Result<serde_json::Value> {
    let mut coalesced = Vec::new();
    let mut change_seqs = Vec::new();
    for node in testnet.nodes().iter().filter(|n| n.role == Role::Miner) {
        let log = log_since(testnet, marks, &node.name);
        coalesced.extend(log_values(&log, "capacity published", "coalesced_ms"));
        change_seqs.extend(log_values(&log, "capacity published", "seq"));
    }
    let facilitator = testnet
        .nodes()
        .iter()
        .find(|n| n.role == Role::Facilitator)
        .map(|n| n.name.clone())
        .context("no facilitator")?;
    // Records the facilitator kept during the job phase: (seq, age).
    let kept: Vec<(f64, f64)> = log_since(testnet, marks, &facilitator)
        .lines()
        .filter(|l| l.contains("record kept"))
        .filter_map(|l| Some((field_value(l, "seq")?, field_value(l, "age_ms")?)))
        .collect();
    let change_ages: Vec<f64> = kept
        .iter()
        .filter(|(seq, _)| change_seqs.contains(seq))
        .map(|(_, age)| *age)
        .collect();
    let all_ages: Vec<f64> = kept.iter().map(|(_, age)| *age).collect();
    let summary = |name: &str, values: Vec<f64>| {
        let (n, p50, p99, max) = latency_summary(values);
        println!("  {name}: n={n}, p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms");
        serde_json::json!({"n": n, "p50_ms": p50, "p99_ms": p99, "max_ms": max})
    };
    println!(
        "== capacity-change latency, {phase} ({jobs} concurrent jobs, each taking and freeing an executor)"
    );
    let json = serde_json::json!({
        "coalesce": summary("change -> signed record, on the miner (coalescing)", coalesced),
        "to_facilitator": summary("capacity record signed -> kept by the facilitator", change_ages),
        "any_update_to_facilitator": summary("any record update signed -> kept by the facilitator", all_ages),
    });
    println!(
        "  (change -> facilitator is the sum of the first two; coalescing waits at most {} ms by design)",
        horde_node::server::discovery::CAPACITY_COALESCE.as_millis()
    );
    Ok(json)
}

/// Runs `jobs` jobs at once and measures the capacity changes they make (see
/// [`capacity_latency`]); returns each job's submit → verified endpoint time and the latencies.
fn job_phase(
    runtime: &tokio::runtime::Runtime,
    testnet: &Testnet,
    program: &std::path::Path,
    jobs: usize,
    phase: &str,
) -> anyhow::Result<(Vec<f64>, serde_json::Value)> {
    let marks = log_marks(testnet);
    let job_ms = concurrent_jobs(runtime, testnet, program, jobs)?;
    // The freed executors' records are on their way.
    std::thread::sleep(Duration::from_secs(2));
    let (_, job_p50, _, job_max) = latency_summary(job_ms.clone());
    println!(
        "  {jobs} concurrent jobs, {phase}: endpoint verified in {job_p50:.0} ms median, {job_max:.0} ms max (executors spawned on demand)"
    );
    let latency = capacity_latency(testnet, &marks, jobs, phase)?;
    Ok((job_ms, latency))
}

/// Prints the idle window's gossip figures (`delta`: each counter's growth over the `secs` window,
/// `GOSSIP_FIELDS` order).
fn print_gossip(nodes: usize, secs: f64, delta: &[f64], network_cpu: f64) {
    let per_sec = |i: usize| delta[i] / secs;
    println!(
        "== gossip at idle, {nodes} nodes, {secs:.0} s window (whole network, from the nodes' counters)"
    );
    println!(
        "  records published: {:.2}/s; messages received {:.1}/s ({:.2}/s per node): accepted {:.1}/s (= signature checks that kept a record), ignored {:.1}/s, rejected {:.1}/s",
        per_sec(PUBLISHED),
        per_sec(RECEIVED),
        per_sec(RECEIVED) / nodes as f64,
        per_sec(ACCEPTED),
        per_sec(IGNORED),
        per_sec(REJECTED)
    );
    println!(
        "  whole-directory fetches: {:.0} sent, {:.0} served; network idle CPU {network_cpu:.1}% of one core",
        delta[FETCHES_SENT], delta[FETCHES_SERVED]
    );
    let bytes_per_node = per_sec(RECEIVED_BYTES) / nodes as f64;
    println!(
        "  record bytes received per node: {bytes_per_node:.0} B/s (gossip payloads; control frames and QUIC overhead not counted); load average {}",
        load_average()
    );
}

/// Waits until the start-up's pull syncs are over (no node sent a whole-directory fetch for 6 s:
/// each node pulls every 3 s after its join until 3 pulls in a row brought nothing new), at most
/// [`SETTLE_LIMIT`], so that the idle window that follows measures a network at rest, not the
/// tail of its start. Prints how long it waited.
fn settle(testnet: &Testnet) {
    let started = Instant::now();
    let mut last = network_counters(testnet)[FETCHES_SENT];
    // Counters are logged at most every 5 s, when they changed.
    std::thread::sleep(Duration::from_secs(6));
    loop {
        let now = network_counters(testnet)[FETCHES_SENT];
        if now == last || started.elapsed() >= SETTLE_LIMIT {
            println!(
                "  start-up pull syncs over {:.0} s after the job phase ({} whole-directory fetches sent since start)",
                started.elapsed().as_secs_f64(),
                now
            );
            return;
        }
        last = now;
        std::thread::sleep(Duration::from_secs(6));
    }
}

/// Prints how long the network took to converge (by the harness's poll, and in ms by the nodes'
/// logs), and what that time is made of.
fn print_convergence(
    testnet: &Testnet,
    args: &Args,
    (converged, by_logs): (Duration, Option<f64>),
    total: Duration,
) {
    let nodes = testnet.nodes().len();
    println!(
        "== discovery: {nodes} nodes (1 facilitator, {} validators, {} miners), one machine, {}",
        args.validators,
        args.miners,
        if args.join_through_validators {
            "validators joining through the facilitator, miners through a validator each"
        } else {
            "all joining through the facilitator"
        }
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
    match by_logs {
        Some(ms) => println!(
            "  by the nodes' own logs: converged {ms:.0} ms after the harness started (the last \
             pair's `node discovered` line; the poll saw it {:.0} ms later, the observers \
             answering it on a busy machine)",
            converged.as_secs_f64() * 1e3 - ms
        ),
        None => println!("  by the nodes' own logs: a pair without a `node discovered` line"),
    }
    println!(
        "  harness total (build check, keys, configs, spawn, converge): {:.0} ms",
        total.as_secs_f64() * 1e3
    );
}

/// Unix time in ms of a log line's leading RFC 3339 timestamp (`2026-12-07T03:34:24.972138Z`).
fn line_unix_ms(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut date = date.split('-').map(str::parse::<i64>);
    let (year, month, day) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let mut time = time.split(':').map(str::parse::<f64>);
    let (hours, minutes, seconds) = (time.next()?.ok()?, time.next()?.ok()?, time.next()?.ok()?);
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(((days * 86_400) as f64 + hours * 3600.0 + minutes * 60.0 + seconds) * 1e3)
}

/// When discovery converged by the nodes' own logs, as unix ms: the latest of the first `node
/// discovered` lines of the pairs the harness waits for (the facilitator learning each node,
/// each validator each miner). The harness's poll sees it later by however long the observers
/// take to answer it.
fn converged_by_logs(testnet: &Testnet) -> Option<f64> {
    let nodes = testnet.nodes();
    let mut latest = 0.0f64;
    let observers = nodes
        .iter()
        .filter(|n| matches!(n.role, Role::Facilitator | Role::Validator));
    for observer in observers {
        let log = testnet.log(&observer.name);
        let mut first = std::collections::HashMap::new();
        for line in log.lines().filter(|l| l.contains("node discovered")) {
            let hotkey = line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("hotkey="));
            if let (Some(hotkey), Some(at)) = (hotkey, line_unix_ms(line)) {
                first.entry(hotkey).or_insert(at);
            }
        }
        let wanted = nodes.iter().filter(|n| {
            n.name != observer.name && (observer.role == Role::Facilitator || n.role == Role::Miner)
        });
        for node in wanted {
            latest = latest.max(*first.get(node.hotkey.to_string().as_str())?);
        }
    }
    Some(latest)
}

/// Runs `jobs` jobs at once through the converged network; returns each one's time from
/// submission to a verified endpoint, in ms.
fn concurrent_jobs(
    runtime: &tokio::runtime::Runtime,
    testnet: &Testnet,
    program: &std::path::Path,
    jobs: usize,
) -> anyhow::Result<Vec<f64>> {
    let request = JobRequest::command("cpu", program.to_str().context("utf-8 path")?);
    runtime.block_on(async {
        let client = Client::new(SecretKey::generate(), testnet.facilitator())?;
        let mut runs = tokio::task::JoinSet::new();
        for _ in 0..jobs {
            let (client, request) = (client.clone(), request.clone());
            runs.spawn(async move {
                let submitted = Instant::now();
                let mut job = client.submit(&request).await?;
                job.wait_for_endpoint().await?;
                let ms = submitted.elapsed().as_secs_f64() * 1e3;
                job.terminate().await?;
                job.wait_for_end().await?;
                anyhow::Ok(ms)
            });
        }
        let mut all = Vec::new();
        while let Some(ms) = runs.join_next().await {
            all.push(ms??);
        }
        anyhow::Ok(all)
    })
}

/// Loopback traffic over an idle window.
struct Loopback {
    /// Bytes over the whole window.
    total: u64,
    /// Bytes of the median second (the traffic between refresh waves: a wave of 256 records
    /// lasts a few seconds of the window) and of the busiest.
    median_second: f64,
    busiest_second: f64,
}

impl Loopback {
    /// Prints the figures per node (`secs`: the window's length) and returns them as JSON.
    fn report(&self, secs: f64, nodes: usize) -> serde_json::Value {
        let nodes = nodes as f64;
        let per_sec = self.total as f64 / secs / nodes;
        let (median, busiest) = (self.median_second / nodes, self.busiest_second / nodes);
        println!(
            "  loopback traffic per node: {per_sec:.0} B/s (every byte on lo over the window: IP/UDP/QUIC headers, control frames, ACKs and keep-alives included); median second {median:.0} B/s, busiest {busiest:.0} B/s"
        );
        serde_json::json!({"bytes_per_sec": per_sec, "median_second": median, "busiest_second": busiest})
    }
}

/// Samples the loopback byte counter every second for `secs` seconds.
fn loopback_over(secs: u64) -> anyhow::Result<Loopback> {
    let start = Instant::now();
    let first = loopback_bytes()?;
    let mut seconds = Vec::new();
    let mut last = first;
    for second in 1..=secs {
        std::thread::sleep(
            (start + Duration::from_secs(second)).saturating_duration_since(Instant::now()),
        );
        let now = loopback_bytes()?;
        seconds.push(now.saturating_sub(last) as f64);
        last = now;
    }
    let (_, median_second, _, busiest_second) = latency_summary(seconds);
    Ok(Loopback {
        total: last.saturating_sub(first),
        median_second,
        busiest_second,
    })
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
    let started_unix_ms = horde_node::client::now().0 as f64;
    let testnet = Testnet::start(TestnetConfig {
        validators: args.validators,
        miners: args.miners,
        executors_per_miner: 1,
        // No executor processes: the memory measured is the nodes' own.
        prewarm: 0,
        storage: 0,
        // The nodes' gossip counters are logged at debug, every 5 s.
        // The latency lines too (capacity changes, records kept).
        log_filter: format!(
            "warn,horde_node::server::discovery::stats=debug,{}=debug{}{}",
            horde_node::server::discovery::LATENCY_TARGET,
            if args.log.is_empty() { "" } else { "," },
            args.log
        ),
        converge_timeout: Duration::from_secs(120),
        dir: args.dir.clone(),
        join_through_validators: args.join_through_validators,
        ..TestnetConfig::default()
    })?;
    let converged = testnet.converged_in().context("discovery did not run")?;
    let total = started.elapsed();
    let nodes = testnet.nodes().len();
    let by_logs = converged_by_logs(&testnet).map(|at| at - started_unix_ms);
    print_convergence(&testnet, &args, (converged, by_logs), total);
    println!("  load average at convergence: {}", load_average());
    let jobs = args.jobs.clamp(1, args.miners.max(1));
    let (job_ms, latency) = job_phase(
        &runtime,
        &testnet,
        &program,
        jobs,
        "right after convergence",
    )?;
    // The idle window: CPU and counters at both ends (counters are logged every 5 s, so both
    // ends are read just after a fresh line).
    let pids = node_pids(&testnet);
    anyhow::ensure!(
        pids.len() == nodes,
        "found {} of {nodes} node processes",
        pids.len()
    );
    settle(&testnet);
    let cpu_start: Vec<(String, f64)> = pids
        .iter()
        .map(|(name, pid)| Ok((name.clone(), cpu_secs(*pid)?)))
        .collect::<anyhow::Result<_>>()?;
    let counters_start = network_counters(&testnet);
    let window = Instant::now();
    let loopback = loopback_over(args.idle_secs)?;
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
    print_gossip(nodes, secs, &delta, network_cpu);
    let bytes_per_node = per_sec(RECEIVED_BYTES) / nodes as f64;
    let loopback = loopback.report(secs, nodes);
    println!(
        "  totals since start: {}",
        GOSSIP_FIELDS
            .iter()
            .zip(counters_end)
            .map(|(f, v)| format!("{f} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The same jobs once more, in a network that has been up for a while: the start-up's pull
    // syncs are over and the load average has fallen, as in a network that runs for days.
    let (_, steady) = job_phase(
        &runtime,
        &testnet,
        &program,
        jobs,
        "in a settled network (after the idle window)",
    )?;
    let worst = memory.iter().map(|m| m.max).fold(0.0, f64::max);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let p99 = |phase: &serde_json::Value| {
        phase["to_facilitator"]["p99_ms"]
            .as_f64()
            .unwrap_or(f64::MAX)
    };
    println!(
        "  targets (issue 17, 256 nodes): convergence <= 10000 ms: {}; idle RSS <= 25 MiB (worst node {worst:.1}): {}; network idle CPU <= 10% of a core: {}; capacity change -> facilitator p99 <= 200 ms: {} right after convergence ({:.0} ms), {} settled ({:.0} ms)",
        met(converged <= Duration::from_secs(10)),
        met(worst <= 25.0),
        met(network_cpu <= 10.0),
        met(p99(&latency) <= 200.0),
        p99(&latency),
        met(p99(&steady) <= 200.0),
        p99(&steady),
    );
    let json = serde_json::json!({
        "nodes": nodes,
        "validators": args.validators,
        "miners": args.miners,
        "converged_ms": converged.as_secs_f64() * 1e3,
        "converged_by_logs_ms": by_logs,
        "all_started_ms": testnet.started_in().as_secs_f64() * 1e3,
        "job_endpoint_ms": job_ms,
        "capacity_latency": latency,
        "capacity_latency_settled": steady,
        "record_bytes_per_node_per_sec": bytes_per_node,
        "loopback_per_node": loopback,
        "load_average_end": load_average(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_position_names_its_field() {
        let named = [
            (RECEIVED, "received"),
            (ACCEPTED, "accepted"),
            (IGNORED, "ignored"),
            (REJECTED, "rejected"),
            (PUBLISHED, "published"),
            (FETCHES_SENT, "fetches_sent"),
            (FETCHES_SERVED, "fetches_served"),
            (RECEIVED_BYTES, "received_bytes"),
        ];
        for (position, field) in named {
            assert_eq!(GOSSIP_FIELDS[position], field);
        }
    }

    #[test]
    fn log_timestamps_are_read_as_unix_milliseconds() {
        let at = |line: &str| line_unix_ms(line).map(|ms| (ms * 1e3).round() / 1e3);
        let line = "2026-12-07T03:34:24.972138Z  INFO discovery: node discovered";
        assert_eq!(at(line), Some(1_796_614_464_972.138));
        assert_eq!(at("2024-02-29T23:59:59.5Z x"), Some(1_709_251_199_500.0));
        assert_eq!(at("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(at("  INFO no timestamp"), None);
        assert_eq!(at("2026-12-07 03:34:24Z"), None);
    }
}
