//! Whether any job was lost or run twice, from three independent records:
//! - the client's: every job reached exactly one terminal status, the expected one
//!   (`Completed` after the client's terminate);
//! - the facilitator's: attached to afresh after the run, its stored history of every job ends
//!   in exactly one terminal status, the same the client saw;
//! - the executors': every executor's log (`<miner>/data/executors/<slot>/executor.log`) has a
//!   `job started` line per job process it started, under the job's span; across all executors
//!   of all miners each job must have started exactly once (once at most for a job that never
//!   reached its endpoint).

use std::collections::HashMap;
use std::path::Path;

use horde_node::client::Client;
use horde_protocol::JobId;
use tokio::task::JoinSet;

use super::jobs::{JobRun, status_name};

/// Attaches (re-reads of the facilitator's store) running at once.
const ATTACH_CONCURRENCY: usize = 32;

/// What the audit found.
#[derive(Debug, Default)]
pub(crate) struct Audit {
    /// Jobs submitted (with a job id).
    pub(crate) jobs: usize,
    /// Jobs not ended as expected by the client's record, with why (at most a few kept).
    pub(crate) unexpected: usize,
    pub(crate) unexpected_examples: Vec<String>,
    /// Jobs whose stored history at the facilitator does not end in exactly one terminal
    /// status equal to the client's.
    pub(crate) facilitator_disagrees: usize,
    pub(crate) facilitator_examples: Vec<String>,
    /// Jobs whose process started more than once (all executors together).
    pub(crate) double_run: usize,
    /// Jobs that reached their endpoint but have no `job started` line.
    pub(crate) not_started: usize,
    /// `job started` lines for jobs this bench did not submit.
    pub(crate) strangers: usize,
    /// Executor logs read.
    pub(crate) executor_logs: usize,
}

impl Audit {
    /// Whether nothing was lost or run twice.
    pub(crate) fn clean(&self) -> bool {
        self.unexpected == 0
            && self.facilitator_disagrees == 0
            && self.double_run == 0
            && self.not_started == 0
            && self.strangers == 0
    }
}

const EXAMPLES: usize = 5;

/// Audits `runs` (every job of the bench) against the facilitator through `clients` and
/// against the executor logs under the testnet directory `dir`.
pub(crate) async fn audit(clients: &[Client], runs: &[JobRun], dir: &Path) -> Audit {
    let mut audit = Audit {
        jobs: runs.iter().filter(|r| r.job_id.is_some()).count(),
        ..Audit::default()
    };
    for run in runs.iter().filter(|r| !r.ended_as_expected()) {
        audit.unexpected += 1;
        if audit.unexpected_examples.len() < EXAMPLES {
            let end = run.end.as_ref().map_or("no end".to_owned(), status_name);
            audit.unexpected_examples.push(format!(
                "{}: {end}, {} terminal statuses, {}",
                run.job_id.map_or("(no id)".to_owned(), |id| id.fmt_short()),
                run.terminal_statuses,
                run.error.as_deref().unwrap_or("no error")
            ));
        }
    }
    facilitator_view(clients, runs, &mut audit).await;
    executor_view(runs, dir, &mut audit);
    audit
}

/// Attaches to every job again and compares the facilitator's stored history with the
/// client's record.
async fn facilitator_view(clients: &[Client], runs: &[JobRun], audit: &mut Audit) {
    let mut tasks = JoinSet::new();
    let mut pending = runs.iter().filter_map(|run| Some((run.job_id?, run)));
    loop {
        while tasks.len() < ATTACH_CONCURRENCY {
            let Some((job_id, run)) = pending.next() else {
                break;
            };
            let client = clients[run.client].clone();
            let seen = run.end.clone();
            tasks.spawn(async move {
                let stored = async {
                    let mut handle = client.attach(job_id, None).await?;
                    let end = handle.wait_for_end().await?;
                    let terminals = handle
                        .history()
                        .iter()
                        .filter(|u| u.status.is_terminal())
                        .count();
                    anyhow::Ok((end, terminals))
                };
                match stored.await {
                    Ok((end, 1)) if Some(&end) == seen.as_ref() => None,
                    Ok((end, terminals)) => Some(format!(
                        "{}: stored {} ({terminals} terminal statuses), client saw {}",
                        job_id.fmt_short(),
                        status_name(&end),
                        seen.as_ref().map_or("no end".to_owned(), status_name)
                    )),
                    Err(error) => Some(format!("{}: attach: {error:#}", job_id.fmt_short())),
                }
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let verdict = joined.unwrap_or_else(|error| Some(format!("attach task: {error}")));
        if let Some(verdict) = verdict {
            audit.facilitator_disagrees += 1;
            if audit.facilitator_examples.len() < EXAMPLES {
                audit.facilitator_examples.push(verdict);
            }
        }
    }
}

/// The short job ids (`job{job=…}` span) of the `job started` lines of one executor log.
fn started_jobs(log: &str) -> impl Iterator<Item = &str> {
    log.lines()
        .filter(|line| line.contains("job started"))
        .filter_map(|line| {
            let after = line.split_once("job{job=")?.1;
            after.split(['}', ' ']).next()
        })
}

/// Every executor log of every miner under `dir`.
fn executor_logs(dir: &Path) -> Vec<String> {
    let mut logs = Vec::new();
    let Ok(nodes) = std::fs::read_dir(dir) else {
        return logs;
    };
    for node in nodes.filter_map(Result::ok) {
        let Ok(slots) = std::fs::read_dir(node.path().join("data").join("executors")) else {
            continue;
        };
        for slot in slots.filter_map(Result::ok) {
            if let Ok(log) = std::fs::read_to_string(slot.path().join("executor.log")) {
                logs.push(log);
            }
        }
    }
    logs
}

fn executor_view(runs: &[JobRun], dir: &Path, audit: &mut Audit) {
    let logs = executor_logs(dir);
    audit.executor_logs = logs.len();
    let mut started: HashMap<String, usize> = HashMap::new();
    for log in &logs {
        for job in started_jobs(log) {
            *started.entry(job.to_owned()).or_default() += 1;
        }
    }
    // Short ids are 4 bytes: count the bench's jobs per short id, so that two of them sharing
    // one (one chance in ~10^4 at a thousand jobs) are not taken for a double run.
    let mut ours: HashMap<String, (usize, usize)> = HashMap::new();
    for run in runs {
        if let Some(job_id) = run.job_id {
            let entry = ours.entry(JobId::fmt_short(&job_id)).or_default();
            entry.0 += 1;
            entry.1 += usize::from(run.endpoint_ms.is_some());
        }
    }
    for (short, (jobs, reached)) in &ours {
        let count = started.get(short).copied().unwrap_or(0);
        audit.double_run += count.saturating_sub(*jobs);
        audit.not_started += reached.saturating_sub(count);
    }
    audit.strangers = started
        .iter()
        .filter(|(short, _)| !ours.contains_key(*short))
        .map(|(_, count)| count)
        .sum();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn started_lines_give_their_job() {
        let log = "2026-12-05T17:00:00Z  INFO job{job=0a1b2c3d}: horde_node::server::executor: job started elapsed=3ms\n\
                   2026-12-05T17:00:01Z  INFO job{job=0a1b2c3d}: horde_node::server::executor: job over\n\
                   2026-12-05T17:00:02Z  INFO job{job=99887766}: horde_node::server::executor: job started elapsed=4ms\n";
        assert_eq!(
            started_jobs(log).collect::<Vec<_>>(),
            ["0a1b2c3d", "99887766"]
        );
    }
}
