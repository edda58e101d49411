//! Accounting receipts across real processes: a job runs through the testnet; the validator's and
//! the miner's data directories then both hold its started, accepted and finished receipts,
//! signed by the validator and countersigned by the miner; and `horde receipts` lists them inside
//! a time window and not outside it, and refuses bad input with a reason.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use horde_node::client::{Client, JobRequest, now};
use horde_node::receipts::{StoredReceipt, log_path, read_log};
use horde_node::receipts_cli::format_time;
use horde_protocol::{
    AccountingReceipt, JobId, JobOutcome, JobStatus, ReceiptKind, SecretKey, UnixMillis,
};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary, horde_binary};

fn data_dir(testnet: &Testnet, name: &str) -> PathBuf {
    let node = testnet.node(name).unwrap();
    node.config.parent().unwrap().join("data")
}

/// The receipts for `job` in a data directory, once all three are there (or after 20 s).
fn receipts_for(dir: &Path, job: JobId) -> Vec<(StoredReceipt, AccountingReceipt)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<_> = read_log(&log_path(dir))
            .map(|contents| contents.entries)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|entry| {
                let receipt = entry.record.verify().ok()?.receipt;
                (receipt.job_id == job).then_some((entry, receipt))
            })
            .collect();
        if found.len() >= 3 || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn horde_receipts(args: &[&str]) -> Output {
    Command::new(horde_binary().unwrap())
        .arg("receipts")
        .args(args)
        .output()
        .unwrap()
}

/// `horde receipts --json` rows for `job`.
fn listed(dir: &Path, window: &[&str], job: JobId) -> Vec<serde_json::Value> {
    let mut args = vec!["--data-dir", dir.to_str().unwrap(), "--json"];
    args.extend_from_slice(window);
    let output = horde_receipts(&args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    rows.into_iter()
        .filter(|row| row["job_id"] == job.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_leaves_countersigned_receipts_on_validator_and_miner() {
    let testnet = Testnet::start(TestnetConfig {
        storage: 0,
        ..TestnetConfig::default()
    })
    .unwrap();
    let validator = testnet.node("validator-0").unwrap().hotkey;
    let miner = testnet.node("miner-0").unwrap().hotkey;

    let before = now();
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let program = demo_job_binary().unwrap();
    let request = JobRequest::command("cpu", program.to_str().unwrap());
    let mut job = client.submit(&request).await.unwrap();
    job.wait_for_endpoint()
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", job.history()));
    job.terminate().await.unwrap();
    let end = job.wait_for_end().await.unwrap();
    assert!(matches!(end, JobStatus::Completed(_)), "{end:?}");
    let job_id = job.job_id();

    for name in ["validator-0", "miner-0"] {
        let dir = data_dir(&testnet, name);
        let found = receipts_for(&dir, job_id);
        let kinds: Vec<&str> = found.iter().map(|(_, r)| r.kind.name()).collect();
        assert_eq!(
            {
                let mut sorted = kinds.clone();
                sorted.sort_unstable();
                sorted
            },
            vec!["accepted", "finished", "started"],
            "{name} holds one receipt of each kind:\n{}",
            testnet.log(name)
        );
        for (entry, receipt) in &found {
            assert!(
                entry.record.verify_countersigned().is_ok(),
                "{name}: {} not countersigned: {:?}",
                receipt.kind.name(),
                entry.note
            );
            assert_eq!(receipt.validator, validator);
            assert_eq!(receipt.miner, miner);
            assert_eq!(receipt.executor_class.0, "cpu");
            assert!(receipt.issued_at >= before && receipt.issued_at <= now());
            if let ReceiptKind::Finished {
                outcome,
                started_at,
                time_took_ms,
            } = &receipt.kind
            {
                assert_eq!(*outcome, JobOutcome::Completed);
                assert_eq!(receipt.issued_at.0 - started_at.0, *time_took_ms);
            }
        }
    }
    let after = now();

    // Listed in a window around the job (Unix seconds on one side, RFC 3339 on the other) ...
    let since = (before.0 / 1000).to_string();
    let until = format_time(after.plus_millis(1000), true);
    for name in ["validator-0", "miner-0"] {
        let dir = data_dir(&testnet, name);
        let rows = listed(&dir, &["--since", &since, "--until", &until], job_id);
        assert_eq!(rows.len(), 3, "{name}: {rows:?}");
        for row in &rows {
            assert_eq!(row["countersigned"], true, "{row}");
            assert_eq!(row["valid"], true, "{row}");
            assert_eq!(row["validator"], validator.to_string());
            assert_eq!(row["miner"], miner.to_string());
        }
        // ... and not outside it.
        let earlier = format_time(UnixMillis(before.0 - 60_000), false);
        let just_before = (before.0 / 1000 - 1).to_string();
        assert!(
            listed(
                &dir,
                &["--since", &earlier, "--until", &just_before],
                job_id
            )
            .is_empty()
        );
        let later = ((after.0 / 1000) + 2).to_string();
        assert!(listed(&dir, &["--since", &later], job_id).is_empty());

        // The table names each kind, the job, and says countersigned.
        let output = horde_receipts(&["--data-dir", dir.to_str().unwrap()]);
        let table = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{table}");
        let lines: Vec<&str> = table
            .lines()
            .filter(|l| l.contains(&job_id.to_string()))
            .collect();
        assert_eq!(lines.len(), 3, "{table}");
        for kind in ["started", "accepted", "finished"] {
            assert!(
                lines.iter().any(|l| {
                    let columns: Vec<&str> = l.split_whitespace().collect();
                    columns.first() == Some(&kind) && columns.get(5) == Some(&"yes")
                }),
                "{kind}: {table}"
            );
        }
        assert!(
            lines.iter().any(|l| l.contains("completed after")),
            "{table}"
        );
    }

    // Bad input gets a clear error.
    let dir = data_dir(&testnet, "validator-0");
    let dir = dir.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--data-dir", dir, "--since", "yesterday"],
            "expected RFC 3339",
        ),
        (
            vec!["--data-dir", dir, "--since", "20", "--until", "10"],
            "--since must be earlier than --until",
        ),
        (vec!["--data-dir", "/nonexistent/horde"], "no receipt log"),
    ] {
        let output = horde_receipts(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
