//! `horde job …` and `horde blob …` as a user types them, against a local testnet.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::process::{Command, Output};

use horde_testnet::{Testnet, TestnetConfig, demo_job_binary, horde_binary};

fn horde(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(horde_binary().unwrap())
        .args(args)
        .env("HORDE_STATE_DIR", state)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn job_run_request_status_terminate_and_blob_put_get() {
    let testnet = Testnet::start(TestnetConfig::default()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let facilitator = testnet.facilitator().to_string();
    let storage = testnet.storage().unwrap().to_string();
    let spec = state.path().join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "executor_class = \"cpu\"\nprogram = \"{}\"\nreadiness_http = \"/health\"\n\
             logs_storage = \"{storage}\"\n\n[[volumes]]\npath = \"hello.txt\"\ninline = \"hi\"\n",
            demo_job_binary().unwrap().display()
        ),
    )
    .unwrap();

    let run = horde(
        state.path(),
        &[
            "job",
            "run",
            "--spec",
            spec.to_str().unwrap(),
            "--facilitator",
            &facilitator,
        ],
    );
    let out = text(&run);
    assert!(run.status.success(), "{out}");
    assert!(out.contains("endpoint verified"), "{out}");
    let job = out
        .lines()
        .find_map(|l| l.strip_prefix("job "))
        .unwrap()
        .trim()
        .to_owned();

    let request = horde(
        state.path(),
        &[
            "job",
            "request",
            &job,
            "POST",
            "/echo",
            "--data",
            "over the tunnel",
        ],
    );
    let out = text(&request);
    assert!(request.status.success(), "{out}");
    assert!(
        out.contains("HTTP 200") && out.contains("over the tunnel"),
        "{out}"
    );
    assert!(out.contains("receipt verified"), "{out}");
    let volume = horde(
        state.path(),
        &["job", "request", &job, "GET", "/volume?path=hello.txt"],
    );
    assert!(text(&volume).contains("hi"), "{}", text(&volume));
    let receipts =
        std::fs::read_to_string(state.path().join("jobs").join(format!("{job}.receipts"))).unwrap();
    assert_eq!(receipts.lines().count(), 2);

    let status = horde(state.path(), &["job", "status", &job]);
    let out = text(&status);
    assert!(out.contains("endpoint ready"), "{out}");

    let terminate = horde(state.path(), &["job", "terminate", &job]);
    let out = text(&terminate);
    assert!(terminate.status.success(), "{out}");
    assert!(
        out.contains("completed") && out.contains("(terminated)"),
        "{out}"
    );

    // A bad job id is a clear error.
    let bad = horde(state.path(), &["job", "status", "not-a-job"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("32 hex digits"), "{}", text(&bad));

    // Blob put then get through the CLI.
    let file = state.path().join("data.bin");
    std::fs::write(&file, vec![7u8; 300_000]).unwrap();
    let put = horde(
        state.path(),
        &["blob", "put", file.to_str().unwrap(), "--storage", &storage],
    );
    let out = text(&put);
    assert!(put.status.success(), "{out}");
    let hash = blake3::hash(&std::fs::read(&file).unwrap())
        .to_hex()
        .to_string();
    assert!(out.contains(&hash), "{out}");
    let copy = state.path().join("copy.bin");
    let get = horde(
        state.path(),
        &[
            "blob",
            "get",
            &hash,
            "-o",
            copy.to_str().unwrap(),
            "--storage",
            &storage,
        ],
    );
    assert!(get.status.success(), "{}", text(&get));
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&file).unwrap());
}

/// Issue 16, item 14: a network with no validator or no miner is refused, not silently given
/// one; the demo without storage likewise.
#[test]
fn testnet_shapes_that_cannot_run_a_job_are_refused() {
    let testnet_bin = env!("CARGO_BIN_EXE_horde-testnet");
    for args in [
        &["up", "--miners", "0"][..],
        &["up", "--validators", "0"],
        &["demo", "--executors-per-miner", "0"],
    ] {
        let output = std::process::Command::new(testnet_bin)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("at least 1") || stderr.contains("not in 1.."),
            "{args:?}: {stderr}"
        );
    }
    let output = std::process::Command::new(testnet_bin)
        .args(["demo", "--storage", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("needs --storage 1"), "{stderr}");
}
