//! The load bench (issue 17): many streaming jobs through one facilitator.
//!
//! Starts a local network of real `horde node` processes — one facilitator, `--validators`,
//! `--miners` with enough executors each (all started before the first job), the demo job as
//! the job process, run by the default runner (the isolated process runner, bubblewrap;
//! `--runtime unisolated` for the plain-process runner, to compare) — and several clients, each
//! with its own account key and connection. Then:
//!
//! 1. **Held**: `--jobs` streaming jobs submitted (at `--open-rate` per second, 0 for all at
//!    once) round-robin from the clients; each sends one request through its tunnel and
//!    verifies the job's receipt, and all are held open together. Reported: submit → verified
//!    endpoint p50/p99/max, the request's round trip, resident memory of the facilitator and
//!    the validators idle and with every job open (per open job: (open − idle) / jobs), and
//!    their CPU time per job over the phase (`/proc/PID/stat`). Then all are terminated.
//! 2. **Sustained**: short jobs for `--secs` at `--rate` per second, each submit → endpoint →
//!    one request → terminate → terminal status: achieved jobs/s, latency p50/p99.
//!
//! Finally every job is audited (see `audit`): exactly one terminal status, the expected one,
//! in the client's record and in the facilitator's store; its process started exactly once
//! across all executors. The table goes beside the targets.
//!
//! `cargo run --release -p horde-benches --bin flow-load -- [--jobs N] [--clients N]
//! [--validators N] [--miners N] [--open-rate R] [--secs S] [--rate R]
//! [--runtime isolated|unisolated] [--json PATH]`
//!
//! Layout: `flow-load.rs` (the network, the measurements and the report), `flow-load/jobs.rs`
//! (one job's life and the two phases), `flow-load/audit.rs` (lost or double-run jobs).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use horde_benches::{cpu_secs, latency_summary, load_average};
use horde_node::client::{Client, JobRequest};
use horde_protocol::{Role, SecretKey};
use horde_testnet::{Runtime, Testnet, TestnetConfig, demo_job_binary};

#[path = "flow-load/audit.rs"]
mod audit;
#[path = "flow-load/jobs.rs"]
mod jobs;

use jobs::JobRun;

/// Issue 17's load targets.
const TARGET_CONCURRENT: usize = 250;
const TARGET_ENDPOINT_P99_MS: f64 = 2000.0;
const TARGET_RATE: f64 = 10.0;
const TARGET_SECS: f64 = 60.0;
const TARGET_KIB_PER_JOB: f64 = 64.0;

/// How long the miners' executors have to start and register: hundreds start at once on a
/// small machine.
const EXECUTORS_READY_TIMEOUT: Duration = Duration::from_secs(300);

/// The runner jobs run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RunnerChoice {
    /// The isolated process runner (bubblewrap): the default.
    Isolated,
    /// A plain child process (`runtime = "unisolated"`), for comparison.
    Unisolated,
}

impl RunnerChoice {
    fn runtime(self) -> Runtime {
        match self {
            Self::Isolated => Runtime::Process,
            Self::Unisolated => Runtime::Unisolated,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Isolated => "isolated process runner (bubblewrap; the default)",
            Self::Unisolated => "unisolated process runner (plain child process)",
        }
    }
}

/// Many concurrent streaming jobs through one facilitator, then a sustained run of short jobs;
/// latency, memory and CPU per job, and an audit that no job was lost or run twice.
#[derive(Debug, clap::Parser)]
#[command(name = "flow-load")]
struct Args {
    /// Jobs held open together in phase 1.
    #[arg(long, default_value_t = 250, value_parser = at_least_one)]
    jobs: usize,
    /// Clients, each with its own account key and connection; jobs go round-robin.
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    clients: usize,
    /// Validators.
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    validators: usize,
    /// Miners.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    miners: usize,
    /// Executors per miner (default: enough for --jobs, plus two spare per miner).
    #[arg(long)]
    executors_per_miner: Option<u32>,
    /// Phase-1 submissions per second (0: all at once).
    #[arg(long, default_value_t = 50.0, value_parser = non_negative)]
    open_rate: f64,
    /// Seconds of phase 2, the sustained run of short jobs (0 skips it).
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Short jobs submitted per second in phase 2.
    #[arg(long, default_value_t = 10.0, value_parser = non_negative)]
    rate: f64,
    /// The runner of the jobs.
    #[arg(long, value_enum, default_value_t = RunnerChoice::Isolated)]
    runtime: RunnerChoice,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/flow-load.json")]
    json: String,
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(count) if count >= 1 => Ok(count),
        _ => Err(format!("{text:?}: expected a whole number of at least 1")),
    }
}

fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err(format!("{text:?}: expected a number of at least 0")),
    }
}

/// Waits until every miner has logged `executors` executors registered.
fn wait_for_executors(testnet: &Testnet, executors: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let mut registered = 0;
        for miner in testnet.nodes().iter().filter(|n| n.role == Role::Miner) {
            let log = testnet.log(&miner.name);
            anyhow::ensure!(
                !log.contains("executor failed to start"),
                "{}: an executor failed to start:\n{}",
                miner.name,
                log.lines()
                    .filter(|l| l.contains("executor failed"))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            registered += log.matches("executor registered").count();
        }
        if registered >= executors {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < EXECUTORS_READY_TIMEOUT,
            "{registered} of {executors} executors registered within {EXECUTORS_READY_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Resident memory (KiB) and CPU time (s) of the facilitator and the validators together.
#[derive(Debug, Clone, Copy)]
struct Usage {
    facilitator_rss: f64,
    validators_rss: f64,
    facilitator_cpu: f64,
    validators_cpu: f64,
}

fn usage(testnet: &Testnet) -> anyhow::Result<Usage> {
    let mut usage = Usage {
        facilitator_rss: testnet.rss_kib("facilitator")? as f64,
        validators_rss: 0.0,
        facilitator_cpu: cpu_secs(testnet.pid("facilitator")?)?,
        validators_cpu: 0.0,
    };
    for node in testnet.nodes().iter().filter(|n| n.role == Role::Validator) {
        usage.validators_rss += testnet.rss_kib(&node.name)? as f64;
        usage.validators_cpu += cpu_secs(testnet.pid(&node.name)?)?;
    }
    Ok(usage)
}

fn values(runs: &[JobRun], field: impl Fn(&JobRun) -> Option<f64>) -> Vec<f64> {
    runs.iter().filter_map(field).collect()
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// A table row: figure, measured, target, verdict.
fn row(figure: &str, measured: &str, target: &str, verdict: &str) {
    println!("| {figure} | {measured} | {target} | {verdict} |");
}

fn latency_cell(values: Vec<f64>) -> (String, f64) {
    let (n, p50, p99, max) = latency_summary(values);
    (
        format!("p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms (n={n})"),
        p99,
    )
}

/// What both phases run with.
struct Bench<'a> {
    runtime: &'a tokio::runtime::Runtime,
    testnet: &'a Testnet,
    clients: &'a [Client],
    request: &'a JobRequest,
    args: &'a Args,
}

/// Phase 1: holds `args.jobs` jobs open together and reports them; returns its runs.
fn held_phase(bench: &Bench<'_>) -> anyhow::Result<(Vec<JobRun>, serde_json::Value)> {
    let Bench {
        runtime,
        testnet,
        clients,
        request,
        args,
    } = *bench;
    let jobs = args.jobs;
    let idle = usage(testnet)?;
    let held = runtime.block_on(jobs::HeldJobs::open(clients, request, jobs, args.open_rate));
    let open_count = held.open;
    let opening = held.opening;
    // Let the last statuses settle before reading memory with every job open.
    std::thread::sleep(Duration::from_secs(2));
    let open = usage(testnet)?;
    let load_open = load_average();
    let runs = runtime.block_on(held.release());
    let after = usage(testnet)?;
    let per_job = |open: f64, idle: f64| (open - idle) / jobs as f64;
    let facilitator_kib = per_job(open.facilitator_rss, idle.facilitator_rss);
    let validators_kib = per_job(open.validators_rss, idle.validators_rss);
    let facilitator_cpu_ms = per_job(after.facilitator_cpu, idle.facilitator_cpu) * 1e3;
    let validators_cpu_ms = per_job(after.validators_cpu, idle.validators_cpu) * 1e3;
    let (endpoint, endpoint_p99) = latency_cell(values(&runs, |r| r.endpoint_ms));
    let (request_cell, _) = latency_cell(values(&runs, |r| r.request_ms));
    let ended = runs.iter().filter(|r| r.ended_as_expected()).count();
    let rate = if args.open_rate > 0.0 {
        format!("{} per second", args.open_rate)
    } else {
        "all at once".to_owned()
    };
    println!();
    println!(
        "### Phase 1: {jobs} streaming jobs held open together (submitted {rate}, over {:.1} s until all served)",
        opening.as_secs_f64()
    );
    println!();
    row("figure", "measured", "target (issue 17)", "");
    row("---", "---", "---", "---");
    row(
        "jobs open together (request answered, receipt verified)",
        &format!("{open_count} of {jobs}"),
        &format!(">= {TARGET_CONCURRENT}"),
        met(open_count >= TARGET_CONCURRENT && open_count == jobs),
    );
    row(
        "submit -> verified endpoint",
        &endpoint,
        &format!("p99 <= {TARGET_ENDPOINT_P99_MS:.0} ms"),
        met(endpoint_p99 <= TARGET_ENDPOINT_P99_MS),
    );
    row(
        "request through the tunnel, receipt verified",
        &request_cell,
        "",
        "",
    );
    row(
        "facilitator RSS idle -> all open",
        &format!(
            "{:.1} -> {:.1} MiB",
            idle.facilitator_rss / 1024.0,
            open.facilitator_rss / 1024.0
        ),
        "",
        "",
    );
    row(
        "facilitator memory per open job",
        &format!("{facilitator_kib:.1} KiB"),
        &format!("<= {TARGET_KIB_PER_JOB:.0} KiB"),
        met(facilitator_kib <= TARGET_KIB_PER_JOB),
    );
    row(
        &format!("validators' RSS (all {}) idle -> all open", args.validators),
        &format!(
            "{:.1} -> {:.1} MiB; {validators_kib:.1} KiB per open job",
            idle.validators_rss / 1024.0,
            open.validators_rss / 1024.0
        ),
        "",
        "",
    );
    row(
        "CPU per job, submit to terminal status",
        &format!(
            "facilitator {facilitator_cpu_ms:.2} ms, validators (all) {validators_cpu_ms:.2} ms"
        ),
        "",
        "",
    );
    row(
        "ended as expected (Completed after terminate, one terminal status)",
        &format!("{ended} of {jobs}"),
        "all",
        met(ended == jobs),
    );
    println!("\n(load average with all open: {load_open})");
    let json = serde_json::json!({
        "jobs": jobs, "open": open_count, "open_rate": args.open_rate,
        "opening_secs": opening.as_secs_f64(),
        "endpoint_ms": values(&runs, |r| r.endpoint_ms),
        "request_ms": values(&runs, |r| r.request_ms),
        "facilitator_rss_kib": {"idle": idle.facilitator_rss, "open": open.facilitator_rss},
        "validators_rss_kib": {"idle": idle.validators_rss, "open": open.validators_rss},
        "facilitator_kib_per_open_job": facilitator_kib,
        "validators_kib_per_open_job": validators_kib,
        "facilitator_cpu_ms_per_job": facilitator_cpu_ms,
        "validators_cpu_ms_per_job": validators_cpu_ms,
        "ended_as_expected": ended,
        "load_average_open": load_open,
    });
    Ok((runs, json))
}

/// Phase 2: the sustained run of short jobs; returns its runs.
fn sustained_phase(bench: &Bench<'_>) -> anyhow::Result<(Vec<JobRun>, serde_json::Value)> {
    let Bench {
        runtime,
        testnet,
        clients,
        request,
        args,
    } = *bench;
    let before = usage(testnet)?;
    let sustained = runtime.block_on(jobs::sustained(clients, request, args.secs, args.rate));
    let after = usage(testnet)?;
    let runs = sustained.runs;
    let submitted = runs.len();
    let ended = runs.iter().filter(|r| r.ended_as_expected()).count();
    let span = sustained.span.as_secs_f64();
    let window = args.secs as f64;
    // Completions per second during the run: jobs that ended (as expected) within the window;
    // the tail after it is reported beside.
    let achieved = sustained.ended_in_window as f64 / window;
    let per_job = |after: f64, before: f64| (after - before) / submitted.max(1) as f64 * 1e3;
    let (endpoint, _) = latency_cell(values(&runs, |r| r.endpoint_ms));
    let (whole, _) = latency_cell(values(&runs, |r| r.total_ms));
    let sustained_ok = achieved >= TARGET_RATE && window >= TARGET_SECS && ended == submitted;
    let load = load_average();
    println!();
    println!(
        "### Phase 2: short jobs at {} per second for {} s (submit -> endpoint -> one request -> terminate)",
        args.rate, args.secs
    );
    println!();
    row("figure", "measured", "target (issue 17)", "");
    row("---", "---", "---", "---");
    row(
        "jobs ended as expected / submitted",
        &format!("{ended} / {submitted}"),
        "all",
        met(ended == submitted),
    );
    row(
        "achieved rate (jobs ended within the window / window)",
        &format!(
            "{achieved:.2} jobs/s ({} in {window:.0} s; the last job ended {:.2} s after the window)",
            sustained.ended_in_window,
            span - window
        ),
        &format!(">= {TARGET_RATE:.0} jobs/s for {TARGET_SECS:.0} s"),
        met(sustained_ok),
    );
    row("submit -> verified endpoint", &endpoint, "", "");
    row("submit -> terminal status (whole job)", &whole, "", "");
    row(
        "most jobs in flight at once",
        &sustained.max_in_flight.to_string(),
        "",
        "",
    );
    row(
        "CPU per job",
        &format!(
            "facilitator {:.2} ms, validators (all) {:.2} ms",
            per_job(after.facilitator_cpu, before.facilitator_cpu),
            per_job(after.validators_cpu, before.validators_cpu)
        ),
        "",
        "",
    );
    println!(
        "\n(submissions over {:.1} s; load average at the end: {load})",
        sustained.submitting.as_secs_f64()
    );
    let json = serde_json::json!({
        "secs": args.secs, "rate": args.rate, "submitted": submitted, "ended_as_expected": ended,
        "ended_in_window": sustained.ended_in_window, "load_average_end": load,
        "span_secs": span, "achieved_jobs_per_sec": achieved,
        "max_in_flight": sustained.max_in_flight,
        "endpoint_ms": values(&runs, |r| r.endpoint_ms),
        "total_ms": values(&runs, |r| r.total_ms),
        "facilitator_cpu_ms_per_job": per_job(after.facilitator_cpu, before.facilitator_cpu),
        "validators_cpu_ms_per_job": per_job(after.validators_cpu, before.validators_cpu),
    });
    Ok((runs, json))
}

fn print_audit(audit: &audit::Audit) {
    println!();
    println!("### Audit: every job of both phases");
    println!();
    row("check", "found", "target", "");
    row("---", "---", "---", "---");
    row(
        "jobs not ended as expected (client's record)",
        &format!("{} of {}", audit.unexpected, audit.jobs),
        "0 (zero jobs lost)",
        met(audit.unexpected == 0),
    );
    row(
        "facilitator's stored end differs or not exactly one terminal status",
        &audit.facilitator_disagrees.to_string(),
        "0",
        met(audit.facilitator_disagrees == 0),
    );
    row(
        &format!(
            "job processes started twice (executor logs, {} executors)",
            audit.executor_logs
        ),
        &audit.double_run.to_string(),
        "0",
        met(audit.double_run == 0),
    );
    row(
        "jobs served with no start in any executor log / starts of unknown jobs",
        &format!("{} / {}", audit.not_started, audit.strangers),
        "0 / 0",
        met(audit.not_started == 0 && audit.strangers == 0),
    );
    for example in audit
        .unexpected_examples
        .iter()
        .chain(&audit.facilitator_examples)
    {
        println!("  - {example}");
    }
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let executors = args
        .executors_per_miner
        .unwrap_or_else(|| u32::try_from(args.jobs.div_ceil(args.miners) + 2).unwrap_or(u32::MAX));
    let total_executors = executors as usize * args.miners;
    anyhow::ensure!(
        total_executors >= args.jobs,
        "{} miners x {executors} executors cannot hold {} jobs",
        args.miners,
        args.jobs
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let program = demo_job_binary()?;
    let started = Instant::now();
    let testnet = Testnet::start(TestnetConfig {
        validators: args.validators,
        miners: args.miners,
        executors_per_miner: executors,
        prewarm: executors,
        storage: 0,
        runtime: args.runtime.runtime(),
        registration_timeout_ms: Some(EXECUTORS_READY_TIMEOUT.as_millis() as u64),
        // The miners' registrations, and the executors' `job started` lines for the audit
        // (executors inherit their miner's filter).
        log_filter: "warn,horde_node::server::miner=info,horde_node::server::executor=info"
            .to_owned(),
        converge_timeout: Duration::from_secs(120),
        ..TestnetConfig::default()
    })?;
    let ready = wait_for_executors(&testnet, total_executors)?;
    println!(
        "## flow-load: 1 facilitator, {} validators, {} miners x {executors} executors; {} clients; job: the demo job on the {}",
        args.validators,
        args.miners,
        args.clients,
        args.runtime.describe()
    );
    println!(
        "(network up in {:.1} s, all {total_executors} executors registered {:.1} s after; load average {})",
        started.elapsed().as_secs_f64() - ready.as_secs_f64(),
        ready.as_secs_f64(),
        load_average()
    );
    let mut request = JobRequest::command("cpu", program.to_str().context("utf-8 path")?);
    request.deadlines.readiness_ms = 60_000;
    // A client's endpoint binds its socket in the runtime.
    let _runtime_context = runtime.enter();
    let clients = (0..args.clients)
        .map(|_| Client::new(SecretKey::generate(), testnet.facilitator()))
        .collect::<Result<Vec<_>, _>>()?;
    let bench = Bench {
        runtime: &runtime,
        testnet: &testnet,
        clients: &clients,
        request: &request,
        args: &args,
    };
    let (mut runs, held) = held_phase(&bench)?;
    let mut sustained = serde_json::Value::Null;
    if args.secs > 0 && args.rate > 0.0 {
        let (more, json) = sustained_phase(&bench)?;
        runs.extend(more);
        sustained = json;
    }
    let audit = runtime.block_on(audit::audit(&clients, &runs, testnet.dir()));
    print_audit(&audit);
    let json = serde_json::json!({
        "validators": args.validators, "miners": args.miners, "executors_per_miner": executors,
        "clients": args.clients, "runner": args.runtime.describe(),
        "held": held, "sustained": sustained,
        "audit": {
            "jobs": audit.jobs, "unexpected": audit.unexpected,
            "facilitator_disagrees": audit.facilitator_disagrees,
            "double_run": audit.double_run, "not_started": audit.not_started,
            "strangers": audit.strangers, "executor_logs": audit.executor_logs,
        },
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    println!("\n(json: {})", args.json);
    runtime.block_on(async {
        for client in &clients {
            client.close().await;
        }
    });
    testnet.shutdown();
    anyhow::ensure!(audit.clean(), "jobs were lost or run twice (see the audit)");
    Ok(())
}
