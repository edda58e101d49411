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

/// Runs the demo job with `horde job run` (the spec: the demo job, its `/health` readiness
/// route and `extra` TOML lines); returns the job id once its endpoint is verified.
fn run_demo_job(testnet: &Testnet, state: &std::path::Path, extra: &str) -> String {
    let spec = state.join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "executor_class = \"cpu\"\nprogram = \"{}\"\nreadiness_http = \"/health\"\n{extra}",
            demo_job_binary().unwrap().display()
        ),
    )
    .unwrap();
    let facilitator = testnet.facilitator().to_string();
    let run = horde(
        state,
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
    out.lines()
        .find_map(|l| l.strip_prefix("job "))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn job_run_request_status_terminate_and_blob_put_get() {
    let testnet = Testnet::start(TestnetConfig::default()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let storage = testnet.storage().unwrap().to_string();
    let job = run_demo_job(
        &testnet,
        state.path(),
        &format!(
            "logs_storage = \"{storage}\"\n\n[[volumes]]\npath = \"hello.txt\"\ninline = \"hi\"\n"
        ),
    );

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
        out.contains("HTTP/1.1 200") && out.contains("over the tunnel"),
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

    // A job slow to end its answer, against --max-time: an error within the limit, no file.
    let slow = state.path().join("slow.txt");
    let started = std::time::Instant::now();
    let timed_out = horde(
        state.path(),
        &[
            "job",
            "request",
            &job,
            "GET",
            "/stream?n=100&delay_ms=1000",
            "--max-time",
            "1.5",
            "-o",
            slow.to_str().unwrap(),
        ],
    );
    let out = text(&timed_out);
    assert!(!timed_out.status.success(), "{out}");
    assert!(out.contains("no whole answer within 1.5 s"), "{out}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{out}"
    );
    assert!(!slow.exists());
    for bad in ["0", "-1", "soon", "NaN"] {
        let flag = format!("--max-time={bad}");
        let refused = horde(
            state.path(),
            &["job", "request", &job, "GET", "/health", &flag],
        );
        assert!(!refused.status.success(), "--max-time {bad} accepted");
        assert!(text(&refused).contains("--max-time"), "{}", text(&refused));
    }

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

/// A job whose `logs_storage` names a key nobody runs (at the storage node's real address):
/// its stdout and stderr cannot be uploaded. The final status says so, naming each log, where
/// it was to go and why, and the CLI exits with `EXIT_NOT_UPLOADED` (3), not 0.
#[test]
fn failed_log_uploads_reach_the_final_status_and_the_exit_code() {
    let testnet = Testnet::start(TestnetConfig::default()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let storage = testnet.storage().unwrap();
    let nobody = horde_protocol::SecretKey::from_seed(&[0x5a; 32]).hotkey();
    let logs_storage = horde_protocol::NodeAddr {
        hotkey: nobody,
        addrs: storage.addrs.clone(),
    };
    let job = run_demo_job(
        &testnet,
        state.path(),
        &format!("logs_storage = \"{logs_storage}\"\n"),
    );

    let terminate = horde(state.path(), &["job", "terminate", &job]);
    let out = text(&terminate);
    assert_eq!(terminate.status.code(), Some(3), "{out}");
    for log in ["stdout", "stderr"] {
        let line = out
            .lines()
            .find(|line| line.starts_with(&format!("not uploaded: {log} to blob storage {nobody}")))
            .unwrap_or_else(|| panic!("no line for {log}: {out}"));
        assert!(
            line.len() > "not uploaded: stdout to blob storage ".len() + 60,
            "{line}"
        );
    }
    assert!(
        out.contains("completed") && out.contains("0 outputs"),
        "{out}"
    );
    assert!(out.contains("not uploaded: stdout, stderr"), "{out}");

    let status = horde(state.path(), &["job", "status", &job]);
    let out = text(&status);
    assert_eq!(status.status.code(), Some(3), "{out}");
    assert!(
        out.contains("not uploaded: stderr to blob storage"),
        "{out}"
    );
}

/// Runs `horde` with `args`, polling its peak resident memory (`VmHWM`) from `/proc` until it
/// exits; returns the output and the peak in KiB.
fn horde_peak_rss(state: &std::path::Path, args: &[&str]) -> (Output, u64) {
    use std::io::Read as _;
    let mut child = Command::new(horde_binary().unwrap())
        .args(args)
        .env("HORDE_STATE_DIR", state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stderr.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let mut peak_kib = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        // A zombie's status has no VmHWM: the last reading while it ran stands.
        if let Some(kib) = std::fs::read_to_string(&status_path).ok().and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        }) {
            peak_kib = peak_kib.max(kib);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (output, peak_kib)
}

/// `horde job request` returns a body's exact bytes, streamed: 100 MB of random bytes (invalid
/// UTF-8 throughout) echoed by the job come back byte-exact on stdout and through `-o FILE`
/// (which appears only once the receipt verified, with no temporary file left beside it), the
/// head on stderr (or first on stdout with `-i`), and the command's peak memory stays far
/// below the body's size.
#[test]
fn job_request_streams_a_100_mb_binary_body_byte_exact_in_bounded_memory() {
    const SIZE: usize = 100_000_000;
    const RSS_BOUND_KIB: u64 = 64 * 1024;
    let testnet = Testnet::start(TestnetConfig::default()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let job = run_demo_job(&testnet, state.path(), "");

    let mut body = vec![0u8; SIZE];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in body.chunks_mut(8) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        chunk.copy_from_slice(&rng.to_le_bytes()[..chunk.len()]);
    }
    assert!(std::str::from_utf8(&body).is_err());
    let input = state.path().join("input.bin");
    std::fs::write(&input, &body).unwrap();
    let input = input.to_str().unwrap();

    // On stdout, the head on stderr.
    let echo = [
        "job",
        "request",
        &job,
        "POST",
        "/echo",
        "--data-file",
        input,
    ];
    let (stdout, peak_kib) = horde_peak_rss(state.path(), &echo);
    let err = String::from_utf8_lossy(&stdout.stderr).into_owned();
    assert!(stdout.status.success(), "{err}");
    assert!(err.starts_with("HTTP/1.1 200"), "{err}");
    assert!(err.contains("receipt verified"), "{err}");
    assert_eq!(stdout.stdout.len(), SIZE);
    assert!(
        stdout.stdout == body,
        "the body on stdout differs from what was sent"
    );
    println!("stdout: peak RSS {peak_kib} KiB for {SIZE} bytes");
    assert!(
        peak_kib > 0 && peak_kib < RSS_BOUND_KIB,
        "peak RSS {peak_kib} KiB"
    );
    drop(stdout);

    // To a file, with the head first on stdout.
    let output = state.path().join("out").join("echo.bin");
    std::fs::create_dir(output.parent().unwrap()).unwrap();
    let to_file_args = [&echo[..], &["-i", "-o", output.to_str().unwrap()]].concat();
    let (to_file, peak_kib) = horde_peak_rss(state.path(), &to_file_args);
    let err = String::from_utf8_lossy(&to_file.stderr).into_owned();
    assert!(to_file.status.success(), "{err}");
    let head = String::from_utf8(to_file.stdout).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    assert!(std::fs::read(&output).unwrap() == body, "the file differs");
    let beside: Vec<_> = std::fs::read_dir(output.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(beside, vec![std::ffi::OsString::from("echo.bin")]);
    println!("-o: peak RSS {peak_kib} KiB for {SIZE} bytes");
    assert!(
        peak_kib > 0 && peak_kib < RSS_BOUND_KIB,
        "peak RSS {peak_kib} KiB"
    );

    let terminate = horde(state.path(), &["job", "terminate", &job]);
    assert!(terminate.status.success(), "{}", text(&terminate));
}
