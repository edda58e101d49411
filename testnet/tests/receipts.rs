//! Accounting receipts across real processes: a job runs through the testnet; the validator's and
//! the miner's data directories then both hold its started, accepted and finished receipts,
//! signed by the validator and countersigned by the miner; `horde receipts` lists them inside
//! a time window and not outside it, and refuses bad input with a reason; and a miner that stops
//! answering neither holds up the end of the job nor keeps the validator from storing its receipt,
//! marked not countersigned.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use horde_node::cli::receipts::format_time;
use horde_node::client::{Client, JobRequest, now};
use horde_node::server::receipts::{StoredReceipt, log_path, read_log};
use horde_protocol::{
    AccountingReceipt, JobId, JobOutcome, JobStatus, ReceiptKind, SecretKey, UnixMillis,
};
use horde_testnet::reports::reconfigure;
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary, horde_binary};

fn data_dir(testnet: &Testnet, name: &str) -> PathBuf {
    let node = testnet.node(name).unwrap();
    node.config.parent().unwrap().join("data")
}

/// The receipts for `job` in a data directory now.
fn receipts_now(dir: &Path, job: JobId) -> Vec<(StoredReceipt, AccountingReceipt)> {
    read_log(&log_path(dir))
        .map(|contents| contents.entries)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|entry| {
            let receipt = entry.record.verify().ok()?.receipt;
            (receipt.job_id == job).then_some((entry, receipt))
        })
        .collect()
}

/// The receipts for `job` in a data directory, once all three are there (or after 20 s).
fn receipts_for(dir: &Path, job: JobId) -> Vec<(StoredReceipt, AccountingReceipt)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = receipts_now(dir, job);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_miner_does_not_hold_up_the_job_and_its_receipt_is_stored_uncountersigned() {
    let mut testnet = Testnet::start(TestnetConfig {
        storage: 0,
        ..TestnetConfig::default()
    })
    .unwrap();
    // A countersignature deadline well inside QUIC's idle timeout (10 s), so the validator gives
    // up on the frozen miner by its own deadline.
    reconfigure(&mut testnet, "validator-0", |config| {
        config.receipts.countersign_timeout = Duration::from_millis(1000);
    })
    .unwrap();
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let program = demo_job_binary().unwrap();
    let mut request = JobRequest::command("cpu", program.to_str().unwrap());
    // Long enough to freeze the miner before the executor ends the job (it could not report it).
    request.deadlines.execution_ms = 3_000;
    request.deadlines.upload_ms = 500;
    let mut job = client.submit(&request).await.unwrap();
    job.wait_for_endpoint()
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", job.history()));
    let job_id = job.job_id();
    let validator_dir = data_dir(&testnet, "validator-0");
    // Started and accepted are countersigned before the miner freezes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while receipts_now(&validator_dir, job_id)
        .iter()
        .filter(|(entry, _)| entry.record.verify_countersigned().is_ok())
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "{}", testnet.log("validator-0"));
        std::thread::sleep(Duration::from_millis(50));
    }

    testnet.pause("miner-0").unwrap();
    // The validator's own execution deadline ends the job; the client hears it at once.
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .unwrap()
        .unwrap();
    let ended_at = now();
    assert!(
        matches!(&end, JobStatus::Failed(failure) if failure.stage == horde_protocol::Stage::Execution),
        "{end:?}"
    );

    // The finished receipt is stored once the countersignature deadline has passed.
    let found = receipts_for(&validator_dir, job_id);
    testnet.resume("miner-0").unwrap();
    let (entry, receipt) = found
        .iter()
        .find(|(_, r)| r.kind.name() == "finished")
        .unwrap_or_else(|| panic!("no finished receipt:\n{}", testnet.log("validator-0")));
    assert!(!entry.record.verify().unwrap().countersigned);
    let note = entry.note.as_deref().unwrap();
    assert!(note.contains("no countersignature within 1s"), "{note}");
    assert!(
        entry.stored_at.0 >= ended_at.0,
        "the job ended before the receipt was settled"
    );
    assert!(entry.stored_at.0 - receipt.issued_at.0 >= 1_000);
    let ReceiptKind::Finished { outcome, .. } = &receipt.kind else {
        unreachable!()
    };
    assert_eq!(
        *outcome,
        JobOutcome::TimedOut {
            stage: horde_protocol::Stage::Execution
        }
    );
    let rows = listed(&validator_dir, &[], job_id);
    let finished = rows.iter().find(|r| r["kind"] == "finished").unwrap();
    assert_eq!(finished["countersigned"], false);
    assert_eq!(finished["valid"], true);
    assert!(
        testnet
            .log("validator-0")
            .contains("receipt not countersigned")
    );
}
