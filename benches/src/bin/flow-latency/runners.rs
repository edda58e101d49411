//! The runners side by side, in the same testnet and the same run: submit → verified endpoint,
//! and the cost per tunnel connection of reaching the job's port, for
//! (a) the unisolated process runner (a plain child on the host's loopback; what jobs had
//!     before isolation, `runtime = "unisolated"`), the baseline;
//! (b) the isolated process runner (bubblewrap; the executor reaches the port through the
//!     sandbox init's socket, the bridge);
//! (c) the container runner (the demo job as an image built from local files; the executor
//!     reaches the port from a thread inside the container's network namespace).
//! Jobs alternate between the runners (the order rotating job by job), and so do the requests,
//! so that all see the same machine noise.

use std::time::Instant;

use anyhow::Context as _;
use horde_node::client::{Client, JobRequest};
use horde_node::server::config::ClassConfig;
use horde_protocol::{Program, SecretKey};
use horde_testnet::{Runtime, Testnet, runner_class};

use super::{Spread, ms, tunnel_request};

/// Targets over the unisolated runner (issue 15), ms: isolated p50 and p99, container p50.
const ISOLATED_P50_TARGET: f64 = 10.0;
const ISOLATED_P99_TARGET: f64 = 30.0;
const CONTAINER_P50_TARGET: f64 = 400.0;

/// One runner under test: its class and what its jobs run.
pub(crate) struct RunnerRow {
    /// The row's name, which is also its executor class.
    pub(crate) name: &'static str,
    runtime: Runtime,
    program: Program,
}

/// The rows this host can run: the container row only when an engine answers (else the reason
/// is printed and the row left out).
pub(crate) async fn rows(demo_job: &str) -> Vec<RunnerRow> {
    let command = Program::Command {
        program: demo_job.to_owned(),
    };
    let mut rows = vec![
        RunnerRow {
            name: "unisolated",
            runtime: Runtime::Unisolated,
            program: command.clone(),
        },
        RunnerRow {
            name: "isolated",
            runtime: Runtime::Process,
            program: command,
        },
    ];
    match horde_testnet::image::demo_job_image().await {
        Ok(reference) => rows.push(RunnerRow {
            name: "container",
            runtime: Runtime::Container,
            program: Program::Image { reference },
        }),
        Err(error) => println!("(no container row: {error:#})"),
    }
    rows
}

/// The classes a testnet needs for `rows`: one prewarmed executor each.
pub(crate) fn classes(rows: &[RunnerRow]) -> Vec<ClassConfig> {
    rows.iter()
        .map(|row| runner_class(row.name, row.runtime))
        .collect()
}

/// Samples per row, in the order of the rows.
pub(crate) struct RunnerSamples {
    /// Submit → verified endpoint, ms.
    endpoint: Vec<Vec<f64>>,
    /// `GET /health` on a new tunnel stream until its receipt is verified, ms.
    connection: Vec<Vec<f64>>,
}

fn request(row: &RunnerRow) -> JobRequest {
    let mut request = JobRequest::command(row.name, "");
    request.program = row.program.clone();
    request.deadlines.readiness_ms = 30_000;
    request
}

/// `jobs` jobs per row, rows alternating; then `requests` new-stream round trips per row to
/// one job of each, alternating.
pub(crate) async fn measure(
    testnet: &Testnet,
    rows: &[RunnerRow],
    jobs: usize,
    requests: usize,
) -> anyhow::Result<RunnerSamples> {
    let client = Client::new(SecretKey::generate(), testnet.facilitator())?;
    let mut samples = RunnerSamples {
        endpoint: vec![Vec::with_capacity(jobs); rows.len()],
        connection: vec![Vec::with_capacity(requests); rows.len()],
    };
    // One unmeasured job per row first: first handshakes, the image's first start.
    for round in 0..=jobs {
        for turn in 0..rows.len() {
            let index = (round + turn) % rows.len();
            let submitted = Instant::now();
            let mut job = client.submit(&request(&rows[index])).await?;
            job.wait_for_endpoint()
                .await
                .with_context(|| format!("{} job", rows[index].name))?;
            if round > 0 {
                samples.endpoint[index].push(ms(submitted.elapsed()));
            }
            job.terminate().await?;
            job.wait_for_end().await?;
        }
    }
    let mut running = Vec::new();
    for row in rows {
        let mut job = client.submit(&request(row)).await?;
        let endpoint = job.wait_for_endpoint().await?;
        let connection = job.connect_job(&endpoint).await?;
        tunnel_request(&connection.tunnel).await?;
        running.push((job, connection));
    }
    for _ in 0..requests {
        for (index, (_, connection)) in running.iter().enumerate() {
            let (_, verified) = tunnel_request(&connection.tunnel).await?;
            samples.connection[index].push(verified);
        }
    }
    for (mut job, _) in running {
        job.terminate().await?;
        job.wait_for_end().await?;
    }
    Ok(samples)
}

/// Prints both tables with their deltas over the first row and the targets; their JSON.
pub(crate) fn report(rows: &[RunnerRow], samples: RunnerSamples) -> serde_json::Value {
    let jobs = samples.endpoint.first().map_or(0, Vec::len);
    println!(
        "== runners: submit -> verified endpoint ({jobs} jobs per runner, runners alternating; \
         deltas vs unisolated)"
    );
    let endpoint: Vec<Spread> = samples.endpoint.into_iter().map(Spread::of).collect();
    let mut json = serde_json::Map::new();
    for (row, spread) in rows.iter().zip(&endpoint) {
        let (p50, p99) = (
            spread.median - endpoint[0].median,
            spread.p99 - endpoint[0].p99,
        );
        let target = match row.runtime {
            Runtime::Process => format!(
                "target <= +{ISOLATED_P50_TARGET} p50, <= +{ISOLATED_P99_TARGET} p99: {}",
                pass(p50 <= ISOLATED_P50_TARGET && p99 <= ISOLATED_P99_TARGET)
            ),
            Runtime::Container => format!(
                "target <= +{CONTAINER_P50_TARGET} p50: {}",
                pass(p50 <= CONTAINER_P50_TARGET)
            ),
            _ => "baseline".to_owned(),
        };
        println!(
            "  {:<12} p50 {:>8.2} ms  p99 {:>8.2} ms  (+{p50:.2} p50, +{p99:.2} p99; {target})",
            row.name, spread.median, spread.p99
        );
        json.insert(
            row.name.to_owned(),
            serde_json::json!({"endpoint": spread.json(), "p50_delta_ms": p50,
                               "p99_delta_ms": p99}),
        );
    }
    let requests = samples.connection.first().map_or(0, Vec::len);
    println!(
        "== runners: cost per tunnel connection of reaching the job's port (new tunnel stream, \
         GET /health to the verified receipt, {requests} requests per runner, alternating)"
    );
    let connection: Vec<Spread> = samples.connection.into_iter().map(Spread::of).collect();
    for (row, spread) in rows.iter().zip(&connection) {
        let how = match row.runtime {
            Runtime::Unisolated => "direct loopback connect",
            Runtime::Process => "through the sandbox init's socket (bridge)",
            Runtime::Container => "socket made in the container's netns (netns thread)",
        };
        println!(
            "  {:<12} p50 {:.3} ms  p99 {:.3} ms  (+{:.3} p50 per connection; {how})",
            row.name,
            spread.median,
            spread.p99,
            spread.median - connection[0].median
        );
        if let Some(entry) = json.get_mut(row.name) {
            entry["connection"] = spread.json();
            entry["connection_p50_delta_ms"] =
                serde_json::json!(spread.median - connection[0].median);
        }
    }
    serde_json::Value::Object(json)
}

fn pass(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}
