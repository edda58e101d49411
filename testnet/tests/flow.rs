//! The streaming-job flow across real processes on loopback: the happy path with every kind of
//! traffic, and each negative path ending in its typed status.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::time::Duration;

use horde_node::client::{
    Client, ClientError, JobConnection, JobHandle, JobRequest, VerifiedEndpoint,
};
use horde_protocol::messages::{
    DeclineReason, FailureReason, JobFinished, OutputRef, RejectReason, UploadDone,
};
use horde_protocol::{ControlMessage, UpMessage};
use horde_protocol::{
    EndpointRecord, JobId, JobStatus, NodeAddr, ReadinessProbe, RelativePath, SecretKey, Signed,
    Stage, UploadSpec, UploadTarget, VolumeSource, VolumeSpec,
};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};
use horde_transport::tunnel::http_request;

fn demo_request() -> JobRequest {
    let program = demo_job_binary().expect("demo job binary");
    JobRequest::command("cpu", program.to_str().expect("utf-8 path"))
}

fn start(config: TestnetConfig) -> Testnet {
    Testnet::start(config).expect("testnet starts")
}

async fn submit(testnet: &Testnet, request: &JobRequest) -> (Client, JobHandle) {
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let job = client.submit(request).await.unwrap();
    (client, job)
}

fn kinds(job: &JobHandle) -> Vec<String> {
    job.history()
        .iter()
        .map(|u| {
            let shown = format!("{:?}", u.status);
            shown
                .split(['(', ' ', '{'])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

async fn endpoint(job: &mut JobHandle, testnet: &Testnet) -> VerifiedEndpoint {
    match job.wait_for_endpoint().await {
        Ok(endpoint) => endpoint,
        Err(error) => panic!(
            "{error}\nhistory: {:?}\nminer:\n{}\nvalidator:\n{}",
            job.history(),
            testnet.log("miner-0"),
            testnet.log("validator-0")
        ),
    }
}

async fn get(connection: &JobConnection, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let response = http_request(&connection.tunnel, method, path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    // The receipt is verified inside http_request; check it names this job and key again.
    let receipt = response
        .receipt
        .verify_by(&connection.tunnel.job_key())
        .unwrap();
    assert_eq!(receipt.job_id, connection.tunnel.job_id());
    assert!(receipt.bytes_out >= response.body.len() as u64);
    (response.status, response.body)
}

fn ws_frame(payload: &[u8]) -> Vec<u8> {
    // A masked client text frame (payload < 126 bytes).
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_flow_with_every_kind_of_traffic() {
    let testnet = start(TestnetConfig::default());
    let storage = testnet.storage().unwrap();
    let mut request = demo_request();
    request.volumes = vec![VolumeSpec {
        path: RelativePath("greeting.txt".into()),
        source: VolumeSource::Inline {
            bytes: b"hello from the client".to_vec(),
        },
    }];
    request.logs = Some(UploadTarget::Blob {
        storage: storage.clone(),
    });
    let (_client, mut job) = submit(&testnet, &request).await;
    let endpoint = endpoint(&mut job, &testnet).await;
    assert_eq!(
        kinds(&job),
        [
            "Received",
            "Assigned",
            "Accepted",
            "ExecutorReady",
            "EndpointReady"
        ]
    );
    let connection = job.connect_job(&endpoint).await.unwrap();

    // Buffered HTTP.
    let (status, body) = get(&connection, "GET", "/health", b"").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, body) = get(&connection, "POST", "/echo", b"echo me").await;
    assert_eq!((status, body.as_slice()), (200, b"echo me".as_slice()));
    // Initial volume is there.
    let (status, body) = get(&connection, "GET", "/volume?path=greeting.txt", b"").await;
    assert_eq!(
        (status, body.as_slice()),
        (200, b"hello from the client".as_slice())
    );

    // Streamed response (SSE, chunked).
    let (status, body) = get(&connection, "GET", "/stream?n=5", b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.matches("data: token-").count(), 5, "{text}");
    assert!(text.contains("[DONE]"));

    // WebSocket round trip on one tunnel stream, full duplex.
    let mut ws = connection.tunnel.open().await.unwrap();
    ws.write(
        b"GET /ws HTTP/1.1\r\nHost: job\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains("\r\n\r\n") {
        received.extend_from_slice(&ws.read().await.unwrap().expect("handshake"));
    }
    let head_end = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(String::from_utf8_lossy(&received[..head_end]).starts_with("HTTP/1.1 101"));
    let mut frames = received[head_end..].to_vec();
    ws.write(&ws_frame(b"ping over the tunnel")).await.unwrap();
    while frames.len() < 2 + 20 {
        frames.extend_from_slice(&ws.read().await.unwrap().expect("echo"));
    }
    assert_eq!(frames[0], 0x81);
    assert_eq!(&frames[2..22], b"ping over the tunnel");
    ws.finish_sending().await.unwrap();
    while ws.read().await.unwrap().is_some() {}
    let receipt = ws.receipt().expect("websocket stream receipt").clone();
    assert!(receipt.verify_by(&endpoint.job_key()).is_ok());

    // Volume list mid-session: fetch a file, declare an upload.
    job.send_volumes(
        7,
        vec![VolumeSpec {
            path: RelativePath("later/data.bin".into()),
            source: VolumeSource::Inline {
                bytes: vec![42; 1000],
            },
        }],
        vec![UploadSpec {
            path: RelativePath("result.txt".into()),
            target: UploadTarget::Blob {
                storage: storage.clone(),
            },
        }],
    )
    .await
    .unwrap();
    job.wait_for(|s| matches!(s, JobStatus::VolumesFetched { volume_msg_id: 7 }))
        .await
        .unwrap();
    let (status, body) = get(&connection, "GET", "/volume?path=later/data.bin", b"").await;
    assert_eq!((status, body.len()), (200, 1000));

    // Output uploaded mid-session: the job writes it and tells the executor.
    let (status, body) = get(
        &connection,
        "POST",
        "/output?path=result.txt",
        b"the result",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let done = next_upload_done(&mut job, "the output's").await;
    assert_eq!(done.volume_msg_id, Some(7));
    let output = &done.outputs[0];
    assert_eq!(output.hash, horde_protocol::BlobHash::of(b"the result"));

    // Terminate; logs go to storage.
    job.terminate().await.unwrap();
    let end = job.wait_for_end().await.unwrap();
    let JobStatus::Completed(result) = end else {
        panic!("{end:?}")
    };
    assert!(result.terminated);
    let stdout = result
        .outputs
        .iter()
        .find(|o| o.path.0 == "stdout")
        .expect("stdout uploaded");

    // Outputs and logs are downloadable from storage.
    let downloader = horde_transport::test_utils::localhost_endpoint(&SecretKey::generate());
    let bytes = horde_node::client::blob::get_to_memory(
        &downloader,
        &storage,
        output.hash,
        1 << 20,
        &Default::default(),
        &mut horde_node::client::progress::NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(bytes, &b"the result"[..]);
    let log = horde_node::client::blob::get_to_memory(
        &downloader,
        &storage,
        stdout.hash,
        1 << 20,
        &Default::default(),
        &mut horde_node::client::progress::NoProgress,
    )
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains("/echo"),
        "{}",
        String::from_utf8_lossy(&log)
    );
    assert_eq!(kinds(&job).last().map(String::as_str), Some("Completed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_endpoint_record_is_refused_and_wrong_client_key_cannot_connect() {
    let testnet = start(TestnetConfig::default());
    let (_client, mut job) = submit(&testnet, &demo_request()).await;
    let endpoint = endpoint(&mut job, &testnet).await;
    let miner = job.miner().unwrap();

    // A record re-signed by another key, and one with a tampered byte: both refused.
    let forger = SecretKey::generate();
    let forged = Signed::sign(&forger, &endpoint.record);
    assert!(matches!(
        VerifiedEndpoint::verify(&forged, job.job_id(), &miner, horde_node::client::now()),
        Err(ClientError::BadEndpoint(_))
    ));
    let mut bytes = endpoint.signed.bytes().to_vec();
    bytes[20] ^= 1;
    let tampered: Signed<EndpointRecord> = Signed::from_parts(
        bytes,
        *endpoint.signed.signer(),
        *endpoint.signed.signature(),
    );
    assert!(matches!(
        VerifiedEndpoint::verify(&tampered, job.job_id(), &miner, horde_node::client::now()),
        Err(ClientError::BadEndpoint(_))
    ));
    // A record for another job is refused too.
    assert!(matches!(
        VerifiedEndpoint::verify(
            &endpoint.signed,
            JobId([9; 16]),
            &miner,
            horde_node::client::now()
        ),
        Err(ClientError::BadEndpoint(_))
    ));

    // A client key other than the spec's: the job endpoint refuses it.
    let intruder = JobConnection::connect(job.job_id(), SecretKey::generate(), &endpoint).await;
    let refused = match intruder {
        Err(_) => true,
        Ok(connection) => http_request(&connection.tunnel, "GET", "/health", b"")
            .await
            .is_err(),
    };
    assert!(refused, "a foreign client key reached the job");
    job.terminate().await.unwrap();
    assert!(matches!(
        job.wait_for_end().await.unwrap(),
        JobStatus::Completed(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_exiting_non_zero_fails_in_execution() {
    let testnet = start(TestnetConfig::default());
    let (_client, mut job) = submit(&testnet, &demo_request()).await;
    let endpoint = endpoint(&mut job, &testnet).await;
    let connection = job.connect_job(&endpoint).await.unwrap();
    // The job answers, then exits at once: the answer still arrives whole, with its receipt
    // (the executor lets the streams in flight end before it closes the job endpoint).
    let (status, body) = get(&connection, "GET", "/exit?code=3", b"").await;
    assert_eq!(
        (status, body.as_slice()),
        (200, b"exiting with 3".as_slice())
    );
    let end = job.wait_for_end().await.unwrap();
    match end {
        JobStatus::Failed(failure) => {
            assert_eq!(failure.stage, Stage::Execution);
            assert_eq!(failure.reason, FailureReason::NonZeroExit(3));
            assert_eq!(failure.result.unwrap().exit_code, Some(3));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_never_ready_fails_in_readiness_within_its_deadline() {
    let testnet = start(TestnetConfig::default());
    let mut request = demo_request();
    request.args = vec!["--fail-health".into()];
    request.deadlines.readiness_ms = 1_500;
    let started = std::time::Instant::now();
    let (_client, mut job) = submit(&testnet, &request).await;
    let end = job.wait_for_end().await.unwrap();
    match end {
        JobStatus::Failed(failure) => {
            assert_eq!(failure.stage, Stage::Readiness);
            assert_eq!(failure.reason, FailureReason::Timeout);
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Initial volumes that cannot be fetched fail the job in `VolumeDownload`, before it starts:
/// a blob the storage node does not have (a typed error naming it), and a URL whose server
/// never answers (the stage's deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfetchable_volumes_fail_the_job_in_volume_download() {
    let testnet = start(TestnetConfig::default());
    let mut request = demo_request();
    request.volumes = vec![VolumeSpec {
        path: RelativePath("data.bin".into()),
        source: VolumeSource::Blob {
            hash: horde_protocol::BlobHash(*blake3::hash(b"never stored").as_bytes()),
            size: 12,
            storage: testnet.storage().unwrap(),
        },
    }];
    let (_client, mut job) = submit(&testnet, &request).await;
    match job.wait_for_end().await.unwrap() {
        JobStatus::Failed(failure) => {
            assert_eq!(failure.stage, Stage::VolumeDownload);
            let FailureReason::VolumeFetch(message) = &failure.reason else {
                panic!("{failure:?}");
            };
            assert!(message.contains("data.bin"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // A server that accepts the connection and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut request = demo_request();
    request.deadlines.volume_download_ms = 500;
    request.volumes = vec![VolumeSpec {
        path: RelativePath("data.bin".into()),
        source: VolumeSource::Url {
            url: format!("http://{}/data.bin", silent.local_addr().unwrap()),
            size: None,
            blake3: None,
        },
    }];
    let started = std::time::Instant::now();
    let (_client, mut job) = submit(&testnet, &request).await;
    match job.wait_for_end().await.unwrap() {
        JobStatus::Failed(failure) => {
            assert_eq!(
                (failure.stage, failure.reason),
                (Stage::VolumeDownload, FailureReason::Timeout)
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        testnet.job_processes().is_empty(),
        "no job was started: {:?}",
        testnet.job_processes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_time_limit_ends_the_job() {
    let testnet = start(TestnetConfig::default());
    let mut request = demo_request();
    request.deadlines.execution_ms = 1_500;
    let (_client, mut job) = submit(&testnet, &request).await;
    endpoint(&mut job, &testnet).await;
    let end = tokio::time::timeout(Duration::from_secs(20), job.wait_for_end())
        .await
        .expect("ends within its deadline")
        .unwrap();
    match end {
        JobStatus::Failed(failure) => {
            assert_eq!(failure.stage, Stage::Execution);
            assert_eq!(failure.reason, FailureReason::Timeout);
        }
        other => panic!("{other:?}"),
    }
}

/// With static peers (a closed deployment) the facilitator knows nothing of capacity: the miner
/// itself declines, `Busy` or `NoExecutorForClass`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_free_executor_is_declined_busy() {
    let testnet = start(TestnetConfig {
        discovery: false,
        ..TestnetConfig::default()
    });
    let (_client, mut first) = submit(&testnet, &demo_request()).await;
    endpoint(&mut first, &testnet).await;
    let (_client2, mut second) = submit(&testnet, &demo_request()).await;
    let end = second.wait_for_end().await.unwrap();
    assert_eq!(
        end,
        JobStatus::Rejected(RejectReason::Declined(DeclineReason::Busy))
    );
    // Another class entirely: no executor for it.
    let mut gpu = demo_request();
    gpu.executor_class = horde_protocol::ExecutorClass("gpu-80gb".into());
    let (_client3, mut third) = submit(&testnet, &gpu).await;
    assert_eq!(
        third.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::Declined(DeclineReason::NoExecutorForClass))
    );
    first.terminate().await.unwrap();
    first.wait_for_end().await.unwrap();
}

/// A shell script at `dir/name` with `body`, for miners to start as their executor program.
fn executor_script(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let program = dir.join(name);
    std::fs::write(&program, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    program
}

/// A miner whose executor program fails at start declines the job at once, with the program's
/// exit status and the last line it logged, rather than after the reservation deadline (10 s);
/// the next job tries a fresh executor and is told the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_failing_to_start_is_declined_with_its_reason() {
    let scripts = tempfile::tempdir().unwrap();
    let program = executor_script(
        scripts.path(),
        "broken-executor",
        "echo starting\necho 'no GPU at /dev/nvidia0' >&2\nexit 3\n",
    );
    let testnet = start(TestnetConfig {
        discovery: false,
        prewarm: 0,
        executor_program: Some(program),
        ..TestnetConfig::default()
    });
    for attempt in 0..2 {
        let started = std::time::Instant::now();
        let (_client, mut job) = submit(&testnet, &demo_request()).await;
        let end = job.wait_for_end().await.unwrap();
        let JobStatus::Rejected(RejectReason::Declined(DeclineReason::ExecutorUnavailable(reason))) =
            &end
        else {
            panic!(
                "attempt {attempt}: {end:?}\nminer:\n{}",
                testnet.log("miner-0")
            );
        };
        assert!(reason.contains("exit status: 3"), "{reason}");
        assert!(reason.ends_with("no GPU at /dev/nvidia0"), "{reason}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "attempt {attempt} took {:?}",
            started.elapsed()
        );
    }
}

/// An executor program that starts but never registers is killed once the miner's registration
/// timeout (2 s here) passes, and the job waiting for it is declined at that moment, naming the
/// timeout, rather than after the reservation deadline (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_not_registering_is_killed_and_its_job_declined() {
    let scripts = tempfile::tempdir().unwrap();
    let pid_file = scripts.path().join("executor.pid");
    // `exec`: the pid written is the process the miner started (and must kill).
    let program = executor_script(
        scripts.path(),
        "hung-executor",
        &format!("echo $$ > '{}'\nexec sleep 600\n", pid_file.display()),
    );
    let testnet = start(TestnetConfig {
        discovery: false,
        prewarm: 0,
        executor_program: Some(program),
        registration_timeout_ms: Some(2_000),
        ..TestnetConfig::default()
    });
    let started = std::time::Instant::now();
    let (_client, mut job) = submit(&testnet, &demo_request()).await;
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .expect("the job ends")
        .unwrap();
    let elapsed = started.elapsed();
    let JobStatus::Rejected(RejectReason::Declined(DeclineReason::ExecutorUnavailable(reason))) =
        &end
    else {
        panic!("{end:?}\nminer:\n{}", testnet.log("miner-0"));
    };
    assert!(reason.contains("registration timeout (2s)"), "{reason}");
    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(8)).contains(&elapsed),
        "declined after {elapsed:?}"
    );
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let pid = pid.trim();
    assert!(
        !std::path::Path::new("/proc").join(pid).exists(),
        "the hung executor (pid {pid}) is still there"
    );
}

/// With discovery the facilitator sees from the miner's record that its one executor is busy
/// (`AllBusy`, not `NoMiner`) and that it has no such class: both jobs are refused before any
/// miner is bothered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_capacity_keeps_jobs_off_full_miners() {
    let testnet = start(TestnetConfig::default());
    let (_client, mut first) = submit(&testnet, &demo_request()).await;
    endpoint(&mut first, &testnet).await;
    let (_client2, mut second) = submit(&testnet, &demo_request()).await;
    let refused_after = std::time::Instant::now();
    assert_eq!(
        second.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::AllBusy {
            class: horde_protocol::ExecutorClass("cpu".into()),
            executors: 1,
        })
    );
    // It waited for an executor to free up (up to 2 s) before refusing.
    assert!(
        refused_after.elapsed() >= Duration::from_millis(1500),
        "refused after {:?}",
        refused_after.elapsed()
    );
    let mut gpu = demo_request();
    gpu.executor_class = horde_protocol::ExecutorClass("gpu-80gb".into());
    let (_client3, mut third) = submit(&testnet, &gpu).await;
    assert_eq!(
        third.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::NoMiner)
    );
    // A job submitted while the only executor is busy waits for it: freed within the wait, the
    // executor takes the waiting job instead of it being refused.
    let (_client4, mut fourth) = submit(&testnet, &demo_request()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.terminate().await.unwrap();
    first.wait_for_end().await.unwrap();
    endpoint(&mut fourth, &testnet).await;
    fourth.terminate().await.unwrap();
    fourth.wait_for_end().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_killed_mid_job_takes_its_job_with_it() {
    let testnet = start(TestnetConfig::default());
    let (_client, mut job) = submit(&testnet, &writing_job_with_a_child()).await;
    endpoint(&mut job, &testnet).await;
    let written = job_dirs(&testnet, &job);
    assert_eq!(written.len(), 1, "{written:?}");
    let jobs = testnet.job_processes();
    assert_eq!(jobs.len(), 2, "the job and its sleep: {jobs:?}");
    assert!(
        jobs.iter().any(|(_, cmd)| cmd.starts_with("sleep 600")),
        "{jobs:?}"
    );
    let executors: Vec<_> = testnet
        .processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("executors"))
        .collect();
    assert_eq!(executors.len(), 1, "{executors:?}");
    // SIGKILL: the executor gets no chance to stop its job.
    let status = std::process::Command::new("kill")
        .args(["-KILL", &executors[0].0.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The job's sandbox was tied to it (bwrap dies with its parent, and the sandbox's pid 1
    // takes the job's own child with it).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !testnet.job_processes().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the job outlived its executor: {:?}",
            testnet.job_processes()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the job ends with a failure, reported up the chain.
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .expect("the failure is reported")
        .unwrap();
    assert!(
        matches!(end, JobStatus::HordeFailed(_) | JobStatus::Failed(_)),
        "{end:?}"
    );
    // What the job wrote went with its executor (the miner removes an ended executor's data).
    wait_until_gone(&written, &testnet).await;
}

/// A job with a child of its own and files in its output directory: the shell writes 1 MiB
/// under a directory it then locks (`chmod 000`) and marks that done (`written`), starts
/// `sleep` in the background, then becomes the demo job (which serves the endpoint, so all of
/// it is on disk once the endpoint is ready). `sleep` is in the job's process group.
fn writing_job_with_a_child() -> JobRequest {
    let demo = demo_job_binary().expect("demo job binary");
    let mut request = JobRequest::command("cpu", "/bin/sh");
    request.args = vec![
        "-c".to_owned(),
        "out=\"$HORDE_OUTPUT_DIR\" && mkdir -p \"$out/d/e\" \
         && head -c 1048576 /dev/zero > \"$out/d/e/f\" && chmod 000 \"$out/d/e\" \"$out/d\" \
         && : > \"$out/written\"; sleep 600 & exec \"$0\""
            .to_owned(),
        demo.to_str().expect("utf-8 path").to_owned(),
    ];
    request
}

/// The directories of `job` under the testnet's executors, each with the job's files written.
fn job_dirs(testnet: &Testnet, job: &JobHandle) -> Vec<std::path::PathBuf> {
    let id = job.job_id().to_string();
    let executors = testnet.dir().join("miner-0/data/executors");
    let found: Vec<_> = std::fs::read_dir(executors)
        .unwrap()
        .filter_map(Result::ok)
        .map(|executor| executor.path().join("data/jobs").join(&id))
        .filter(|dir| dir.exists())
        .collect();
    for dir in &found {
        assert!(dir.join("output/written").exists(), "{}", dir.display());
    }
    found
}

/// Waits (at most 20 s) until none of `dirs` is left, nor any earlier run's executors.
async fn wait_until_gone(dirs: &[std::path::PathBuf], testnet: &Testnet) {
    let stale = || -> Vec<String> {
        std::fs::read_dir(testnet.dir().join("miner-0/data"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("executors.stale-"))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<_> = dirs.iter().filter(|dir| dir.exists()).collect();
        if left.is_empty() && stale().is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left on the miner's disk: {left:?} {:?}\n{}",
            stale(),
            testnet.log("miner-0")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miner_killed_mid_job_is_horde_failed() {
    let mut testnet = start(TestnetConfig::default());
    let (_client, mut job) = submit(&testnet, &writing_job_with_a_child()).await;
    endpoint(&mut job, &testnet).await;
    let written = job_dirs(&testnet, &job);
    assert_eq!(written.len(), 1, "{written:?}");
    testnet.kill("miner-0").unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .expect("failure reported within the QUIC idle timeout")
        .unwrap();
    match end {
        JobStatus::HordeFailed(failure) => {
            assert_eq!(failure.reported_by, horde_protocol::Role::Validator);
            assert!(failure.reason.contains("miner"), "{}", failure.reason);
        }
        other => panic!("{other:?}"),
    }
    // The executor, tied to its miner, is gone with it, and so is its job.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let executors: Vec<_> = testnet
            .processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("executors"))
            .chain(testnet.job_processes())
            .collect();
        if executors.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "executor or job still running: {executors:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A miner killed cannot clean up: the job's files are there until it starts again, which
    // removes its earlier run's executors.
    assert!(written[0].exists());
    testnet.start_again("miner-0").unwrap();
    wait_until_gone(&written, &testnet).await;
}

/// A facilitator restart keeps the job's record and the job itself (issue 16, item 2; the
/// tunnel and the outage are covered in `facilitator_restart.rs`): the handle attaches again,
/// sees each status once and in order, and can still end the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facilitator_restart_keeps_the_record_and_the_job() {
    let mut testnet = start(TestnetConfig::default());
    let account = SecretKey::generate();
    let client = Client::new(account.clone(), testnet.facilitator()).unwrap();
    let mut job = client.submit(&demo_request()).await.unwrap();
    endpoint(&mut job, &testnet).await;
    let seen = job.history().to_vec();
    testnet.restart("facilitator").unwrap();
    job.terminate().await.unwrap();
    // The handle notices (the restarted facilitator resets the old connection at once) and
    // attaches again by itself; the terminate request reaches the job.
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .expect("the handle re-attaches and the job ends")
        .unwrap();
    assert!(
        matches!(&end, JobStatus::Completed(result) if result.terminated),
        "{end:?}\n{}",
        testnet.log("facilitator")
    );
    let history = job.history();
    assert!(history.len() > seen.len(), "{history:?}");
    assert_eq!(&history[..seen.len()], seen.as_slice());
    for (index, update) in history.iter().enumerate() {
        assert_eq!(update.seq as usize, index, "{history:?}");
    }
    // A new client of the same account attaching reads the same history.
    let client = Client::new(account, testnet.facilitator()).unwrap();
    let mut attached = client.attach(job.job_id(), None).await.unwrap();
    assert_eq!(attached.wait_for_end().await.unwrap(), end);
    assert_eq!(attached.history(), history);
    // Another account cannot attach to the job.
    let stranger = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let mut other = stranger.attach(job.job_id(), None).await.unwrap();
    assert_eq!(
        other.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::NotOwner)
    );
}

/// A demo job request for executor class `none`, which no miner offers, and its spec signed by
/// `account` for `client_key`, issued now.
fn spec_without_executor(
    account: &SecretKey,
    client_key: &SecretKey,
) -> (JobRequest, Signed<horde_protocol::JobSpec>) {
    let mut request = demo_request();
    request.executor_class = horde_protocol::ExecutorClass("none".into());
    let spec = request.clone().into_spec(
        JobId::random(),
        client_key.hotkey(),
        horde_node::client::now(),
    );
    (request, Signed::sign(account, &spec))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_expired_specs_are_refused() {
    let testnet = start(TestnetConfig {
        prewarm: 0,
        ..TestnetConfig::default()
    });
    let account = SecretKey::generate();
    let client = Client::new(account.clone(), testnet.facilitator()).unwrap();
    let client_key = SecretKey::generate();
    let (request, signed) = spec_without_executor(&account, &client_key);
    let mut first = client
        .submit_signed(signed.clone(), client_key.clone())
        .await
        .unwrap();
    first.wait_for_end().await.unwrap();
    let mut replay = client
        .submit_signed(signed, client_key.clone())
        .await
        .unwrap();
    assert_eq!(
        replay.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::DuplicateJobId)
    );
    // Signed long ago: expired.
    let old = horde_protocol::UnixMillis(horde_node::client::now().0 - 3_600_000);
    let mut expired = client
        .submit_with(&request, JobId::random(), client_key.clone(), old)
        .await
        .unwrap();
    assert_eq!(
        expired.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::Expired)
    );
    // Signed ten minutes ahead (beyond the one minute clocks may disagree): refused too.
    let ahead = horde_protocol::UnixMillis(horde_node::client::now().0 + 600_000);
    let mut future = client
        .submit_with(&request, JobId::random(), client_key, ahead)
        .await
        .unwrap();
    assert_eq!(
        future.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::Expired)
    );
    // Readiness probe kinds other than HTTP are accepted by the spec type.
    let _ = ReadinessProbe::Tcp;
}

/// [`horde_testnet::reports::assign_directly`] (a fresh key, as any key may assign on a
/// testnet) within 10 s, its answer as the control message it came in.
async fn assign_directly(
    validator: horde_protocol::NodeAddr,
    miner: horde_protocol::NodeAddr,
    spec: Signed<horde_protocol::JobSpec>,
) -> ControlMessage {
    let assigned = horde_testnet::reports::assign_directly(&validator, spec, miner);
    let (answer, _session) = tokio::time::timeout(Duration::from_secs(10), assigned)
        .await
        .expect("the validator answers")
        .unwrap();
    ControlMessage::Up(answer)
}

/// A signed spec that has run once, replayed to the validator by a node that saw it (here any
/// key, as a testnet allows any facilitator): refused as a duplicate, also after the validator
/// restarts, rather than driven again on the miner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_replayed_to_the_validator_is_refused_even_after_a_restart() {
    let mut testnet = start(TestnetConfig {
        discovery: false,
        prewarm: 0,
        ..TestnetConfig::default()
    });
    let account = SecretKey::generate();
    let client = Client::new(account.clone(), testnet.facilitator()).unwrap();
    let client_key = SecretKey::generate();
    // A class the miner lacks: the validator accepts the job, the miner declines it.
    let (_, signed) = spec_without_executor(&account, &client_key);
    let mut first = client
        .submit_signed(signed.clone(), client_key)
        .await
        .unwrap();
    assert_eq!(
        first.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::Declined(DeclineReason::NoExecutorForClass))
    );
    let validator = testnet.node("validator-0").unwrap().node_addr();
    let miner = testnet.node("miner-0").unwrap().node_addr();
    let duplicate = ControlMessage::Up(UpMessage::Rejected(RejectReason::DuplicateJobId));
    assert_eq!(
        assign_directly(validator.clone(), miner.clone(), signed.clone()).await,
        duplicate
    );
    testnet.restart("validator-0").unwrap();
    assert_eq!(
        assign_directly(validator.clone(), miner.clone(), signed).await,
        duplicate
    );
    // The validator checks the dates itself: a spec signed ten minutes ahead is refused.
    let mut request = demo_request();
    request.executor_class = horde_protocol::ExecutorClass("none".into());
    let ahead = horde_protocol::UnixMillis(horde_node::client::now().0 + 600_000);
    let future = request.into_spec(JobId::random(), SecretKey::generate().hotkey(), ahead);
    assert_eq!(
        assign_directly(
            validator.clone(),
            miner.clone(),
            Signed::sign(&account, &future)
        )
        .await,
        ControlMessage::Up(UpMessage::Rejected(RejectReason::Expired))
    );
    // A fresh spec is still driven (and declined by the miner, as the first was).
    let (_, fresh) = spec_without_executor(&account, &SecretKey::generate());
    assert_eq!(
        assign_directly(validator, miner, fresh).await,
        ControlMessage::Up(UpMessage::Declined(DeclineReason::NoExecutorForClass))
    );
}

/// An `Assign` the validator acknowledged but was not told to proceed with — the facilitator
/// reset the stream, or said nothing for the validator's whole wait — is dropped before any
/// check or dial: the miner never hears of the job, and the validator has not even recorded its
/// id (the same spec, assigned again and told to proceed, is driven, not refused as a replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_not_told_to_proceed_never_reaches_the_miner() {
    let testnet = start(TestnetConfig {
        discovery: false,
        prewarm: 0,
        ..TestnetConfig::default()
    });
    let account = SecretKey::generate();
    let validator = testnet.node("validator-0").unwrap().node_addr();
    let miner = testnet.node("miner-0").unwrap().node_addr();
    // A class the miner lacks: a spec that reaches it is declined, and logged with its id.
    let (_, withdrawn) = spec_without_executor(&account, &SecretKey::generate());
    let job = |signed: &Signed<horde_protocol::JobSpec>| {
        signed.verify().unwrap().job_id.fmt_short().to_string()
    };
    let session = horde_testnet::reports::assign_without_proceeding(
        &validator,
        withdrawn.clone(),
        miner.clone(),
    )
    .await
    .unwrap();
    drop(session);
    // Nothing said: the validator gives up after its wait and ends the stream.
    let (_, unanswered) = spec_without_executor(&account, &SecretKey::generate());
    let mut session = horde_testnet::reports::assign_without_proceeding(
        &validator,
        unanswered.clone(),
        miner.clone(),
    )
    .await
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), session.recv())
        .await
        .expect("the validator ends the stream after its wait");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    let validator_log = testnet.log("validator-0");
    assert_eq!(
        validator_log
            .matches("assignment dropped before it was acted on")
            .count(),
        2,
        "{validator_log}"
    );
    assert!(
        validator_log.contains("no Proceed within"),
        "{validator_log}"
    );
    let miner_log = testnet.log("miner-0");
    for signed in [&withdrawn, &unanswered] {
        assert!(!miner_log.contains(&job(signed)), "{miner_log}");
    }
    // Told to proceed, the withdrawn spec is driven: the miner declines it.
    let (answer, _session) =
        horde_testnet::reports::assign_directly(&validator, withdrawn.clone(), miner)
            .await
            .unwrap();
    assert_eq!(
        answer,
        UpMessage::Declined(DeclineReason::NoExecutorForClass)
    );
    assert!(testnet.log("miner-0").contains(&job(&withdrawn)));
}

/// A miner frozen for 4 s (SIGSTOP, under the 10 s idle timeout) mid-job: the client keeps
/// talking to the job meanwhile (the tunnel does not pass through the miner), and once the miner
/// runs again the control path works: the client's terminate ends the job `Completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miner_frozen_for_seconds_does_not_end_the_job() {
    let testnet = start(TestnetConfig::default());
    let (_client, mut job) = submit(&testnet, &demo_request()).await;
    let endpoint = endpoint(&mut job, &testnet).await;
    let connection = job.connect_job(&endpoint).await.unwrap();
    testnet.pause("miner-0").unwrap();
    let (status, body) = get(&connection, "POST", "/echo", b"while the miner sleeps").await;
    assert_eq!(
        (status, body.as_slice()),
        (200, b"while the miner sleeps".as_slice())
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    testnet.resume("miner-0").unwrap();
    let (status, _) = get(&connection, "GET", "/health", b"").await;
    assert_eq!(status, 200);
    job.terminate().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(20), job.wait_for_end())
        .await
        .expect("the job ends once terminated")
        .unwrap();
    assert!(matches!(end, JobStatus::Completed(_)), "{end:?}");
}

/// A validator killed mid-job (no close reaches its peers): the facilitator fails the job,
/// naming the validator, once the QUIC idle timeout has passed since its last keep-alive went
/// unanswered: within idle timeout + keep-alive interval (13 s), and a little slack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_validator_fails_the_job_within_the_idle_timeout() {
    let mut testnet = start(TestnetConfig::default());
    let (_client, mut job) = submit(&testnet, &demo_request()).await;
    endpoint(&mut job, &testnet).await;
    let killed = std::time::Instant::now();
    testnet.kill("validator-0").unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .expect("the facilitator fails the job")
        .unwrap();
    let elapsed = killed.elapsed();
    match end {
        JobStatus::HordeFailed(failure) => {
            assert_eq!(failure.reported_by, horde_protocol::Role::Facilitator);
            assert!(failure.reason.contains("validator"), "{}", failure.reason);
        }
        other => panic!("{other:?}"),
    }
    let bound = horde_transport::MAX_IDLE_TIMEOUT
        + horde_transport::KEEP_ALIVE_INTERVAL
        + Duration::from_secs(2);
    assert!(elapsed < bound, "{elapsed:?}");
}

/// Runs the demo job to its endpoint, terminates it, and returns the validators its history
/// records it `Assigned` to.
async fn run_demo_job(testnet: &Testnet) -> Vec<horde_protocol::Hotkey> {
    let (_client, mut job) = submit(testnet, &demo_request()).await;
    endpoint(&mut job, testnet).await;
    job.terminate().await.unwrap();
    job.wait_for_end().await.unwrap();
    job.history()
        .iter()
        .filter_map(|update| match &update.status {
            JobStatus::Assigned { validator, .. } => Some(*validator),
            _ => None,
        })
        .collect()
}

/// A validator killed between jobs keeps its discovery record for up to its lifetime, so jobs
/// may still be given to it. Once the facilitator's connection to it has timed out, the first
/// job that tries it waits out one handshake timeout and goes to the other validator; the jobs
/// after that go to the live validator without trying the dead one again (before, every other
/// job waited 10 s until the record expired: one "validator unreachable" per such job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_go_past_a_validator_that_could_not_be_reached() {
    let mut testnet = start(TestnetConfig {
        validators: 2,
        ..TestnetConfig::default()
    });
    let live = testnet.node("validator-1").unwrap().hotkey;
    testnet.kill("validator-0").unwrap();
    tokio::time::sleep(
        horde_transport::MAX_IDLE_TIMEOUT
            + horde_transport::KEEP_ALIVE_INTERVAL
            + Duration::from_secs(2),
    )
    .await;
    for _ in 0..4 {
        assert_eq!(run_demo_job(&testnet).await, [live]);
    }
    let log = testnet.log("facilitator");
    assert_eq!(log.matches("validator unreachable").count(), 1, "{log}");
}

/// A validator killed with `kill -9` while the facilitator's connection to it still looks open
/// (well within the idle timeout): the `Assign` sent on it is never answered, so the job is
/// taken back after the hand-over's answer timeout and given to the other validator — not
/// recorded `Assigned` to the dead one and then lost, as before the two-step hand-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_given_to_a_killed_validator_goes_to_the_next_one() {
    let mut testnet = start(TestnetConfig {
        validators: 2,
        ..TestnetConfig::default()
    });
    // Two jobs: the facilitator's validator turn passes both, so it holds a connection to each.
    let mut used = Vec::new();
    for _ in 0..2 {
        used.extend(run_demo_job(&testnet).await);
    }
    let dead = testnet.node("validator-0").unwrap().hotkey;
    let live = testnet.node("validator-1").unwrap().hotkey;
    assert!(used.contains(&dead) && used.contains(&live), "{used:?}");
    testnet.kill("validator-0").unwrap();
    for _ in 0..3 {
        assert_eq!(run_demo_job(&testnet).await, [live]);
    }
    let log = testnet.log("facilitator");
    let unreachable: Vec<_> = log
        .lines()
        .filter(|line| line.contains("validator unreachable"))
        .collect();
    assert_eq!(unreachable.len(), 1, "{log}");
    assert!(unreachable[0].contains("no answer within"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_validator_fails_the_job_instead_of_leaving_it_running() {
    let testnet = start(TestnetConfig::default());
    let (_client, mut job) = submit(&testnet, &demo_request()).await;
    endpoint(&mut job, &testnet).await;
    // A hung validator: its process is alive but answers nothing, not even QUIC keep-alives.
    testnet.pause("validator-0").unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .expect("the facilitator times the job out")
        .unwrap();
    testnet.resume("validator-0").unwrap();
    match end {
        JobStatus::HordeFailed(failure) => {
            assert_eq!(failure.reported_by, horde_protocol::Role::Facilitator);
            assert!(failure.reason.contains("validator"), "{}", failure.reason);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_outputs_and_logs_are_uploaded_when_the_job_ends() {
    let testnet = start(TestnetConfig::default());
    let storage = testnet.storage().unwrap();
    let mut request = JobRequest::command("cpu", "/bin/sh");
    request.args = vec![
        "-c".into(),
        "echo the answer > \"$HORDE_OUTPUT_DIR/answer.txt\"; echo started; \
         exec python3 -m http.server --bind 127.0.0.1 \"$HORDE_JOB_PORT\""
            .into(),
    ];
    request.readiness = ReadinessProbe::Tcp;
    request.uploads = vec![UploadSpec {
        path: RelativePath("answer.txt".into()),
        target: UploadTarget::Blob {
            storage: storage.clone(),
        },
    }];
    request.logs = Some(UploadTarget::Blob {
        storage: storage.clone(),
    });
    let (_client, mut job) = submit(&testnet, &request).await;
    endpoint(&mut job, &testnet).await;
    job.terminate().await.unwrap();
    let JobStatus::Completed(result) = job.wait_for_end().await.unwrap() else {
        panic!("{:?}", job.history());
    };
    let names: Vec<&str> = result.outputs.iter().map(|o| o.path.0.as_str()).collect();
    assert_eq!(names, ["answer.txt", "stdout", "stderr"]);
    assert!(
        result.stdout_tail.contains("started"),
        "{}",
        result.stdout_tail
    );
    let downloader = horde_transport::test_utils::localhost_endpoint(&SecretKey::generate());
    let answer = &result.outputs[0];
    let bytes = horde_node::client::blob::get_to_memory(
        &downloader,
        &storage,
        answer.hash,
        1 << 20,
        &Default::default(),
        &mut horde_node::client::progress::NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(bytes, &b"the answer\n"[..]);
}

/// Issue 16, items 6–8: what can be judged without an executor is refused at submit with the
/// field named — by the client before anything is sent, and by the facilitator for a spec
/// signed elsewhere — instead of failing after a whole run (an absolute upload path), after a
/// readiness deadline of 404s (a path without `/`), or never (unbounded deadlines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_that_could_only_fail_late_are_refused_at_submit() {
    let testnet = start(TestnetConfig {
        prewarm: 0,
        ..TestnetConfig::default()
    });
    let account = SecretKey::generate();
    let client = Client::new(account.clone(), testnet.facilitator()).unwrap();
    let storage = testnet.node("miner-0").unwrap().node_addr();

    let mut absolute = demo_request();
    absolute.uploads.push(UploadSpec {
        path: RelativePath("/etc/passwd".into()),
        target: UploadTarget::Blob { storage },
    });
    match client.submit(&absolute).await {
        Err(ClientError::InvalidSpec(error)) => {
            assert_eq!(error.field, "uploads[0].path (\"/etc/passwd\")");
            assert_eq!(error.reason, "absolute path");
        }
        other => panic!("expected InvalidSpec, got {other:?}"),
    }

    let refused_by_facilitator = |request: JobRequest| {
        let client = client.clone();
        let account = account.clone();
        async move {
            let client_key = SecretKey::generate();
            let spec = request.into_spec(
                JobId::random(),
                client_key.hotkey(),
                horde_node::client::now(),
            );
            let mut job = client
                .submit_signed(Signed::sign(&account, &spec), client_key)
                .await
                .unwrap();
            match job.wait_for_end().await.unwrap() {
                JobStatus::Rejected(RejectReason::InvalidSpec(why)) => why,
                other => panic!("expected InvalidSpec, got {other:?}"),
            }
        }
    };
    let mut no_slash = demo_request();
    no_slash.readiness = ReadinessProbe::Http {
        path: "health".into(),
    };
    let why = refused_by_facilitator(no_slash).await;
    assert!(why.starts_with("readiness_http: "), "{why}");
    let mut endless = demo_request();
    endless.deadlines.execution_ms = i64::MAX as u64;
    let why = refused_by_facilitator(endless).await;
    assert!(why.starts_with("deadlines.execution_ms: "), "{why}");
}

/// The job's next `UploadDone` (`which`, for the failure message), within 30 s.
async fn next_upload_done(job: &mut JobHandle, which: &str) -> UploadDone {
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        job.wait_for(|s| matches!(s, JobStatus::UploadDone(_))),
    )
    .await
    .unwrap_or_else(|_| panic!("an UploadDone, {which}: {:?}", job.history()))
    .unwrap();
    let JobStatus::UploadDone(done) = status else {
        unreachable!()
    };
    done
}

/// Terminates the job, which must then end failed in its upload stage, and returns its result.
async fn terminated_with_an_upload_failed(job: &mut JobHandle) -> JobFinished {
    job.terminate().await.unwrap();
    let end = job.wait_for_end().await.unwrap();
    let JobStatus::Failed(failure) = end else {
        panic!("{end:?}")
    };
    assert_eq!(failure.stage, Stage::Upload, "{failure:?}");
    failure.result.expect("the job's result")
}

/// `sent`, an output uploaded mid-session, is in the job's result once, as it was sent.
fn reported_once_as_sent(result: &JobFinished, sent: &OutputRef) {
    let reported: Vec<_> = result
        .outputs
        .iter()
        .filter(|o| o.path == sent.path)
        .collect();
    assert_eq!(reported, vec![sent], "{:?}", result.outputs);
}

/// An upload of the output `name` to `storage`.
fn blob_upload(storage: &NodeAddr, name: &str) -> UploadSpec {
    UploadSpec {
        path: RelativePath(name.into()),
        target: UploadTarget::Blob {
            storage: storage.clone(),
        },
    }
}

/// A testnet with a class `small-outputs` whose jobs may upload 1 MiB in all, and its storage.
fn small_outputs_testnet() -> (Testnet, NodeAddr) {
    let defaults = TestnetConfig::default();
    let testnet = start(TestnetConfig {
        more_classes: vec![horde_node::server::config::ClassConfig {
            output_mb: Some(1),
            ..horde_testnet::runner_class("small-outputs", defaults.runtime)
        }],
        ..defaults
    });
    let storage = testnet.storage().unwrap();
    (testnet, storage)
}

/// A class's `output_mb` is the job's, over all its uploads: a job that asks for one upload
/// after another gets the second refused once the first used the budget, though each would fit
/// alone (before, each POST /outputs could send `output_mb` again). A declared output sent
/// mid-session and unchanged is not sent again at the job's end (before, it was, and that
/// second copy no longer fit the budget: reported not uploaded though it had been).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_mb_bounds_all_of_a_jobs_uploads_together() {
    let (testnet, storage) = small_outputs_testnet();
    let program = demo_job_binary().expect("demo job binary");
    let mut request = JobRequest::command("small-outputs", program.to_str().unwrap());
    request.uploads = ["a.bin", "b.bin"]
        .map(|name| blob_upload(&storage, name))
        .to_vec();
    let (_client, mut job) = submit(&testnet, &request).await;
    let endpoint = endpoint(&mut job, &testnet).await;
    let connection = job.connect_job(&endpoint).await.unwrap();
    let bytes = vec![7u8; 600_000];
    let (status, body) = get(&connection, "POST", "/output?path=a.bin", &bytes).await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"executor_status\":200"), "{body}");
    let done = next_upload_done(&mut job, "the output's").await;
    let (status, body) = get(&connection, "POST", "/output?path=b.bin", &bytes).await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "{body}");
    // Over the budget is the job's own doing: 413, not a server error.
    assert!(body.contains("\"executor_status\":413"), "{body}");
    // As is a file no upload was declared for: 400.
    let (_, body) = get(&connection, "POST", "/output?path=c.bin", b"x").await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(body.contains("\"executor_status\":400"), "{body}");

    let result = terminated_with_an_upload_failed(&mut job).await;
    let refused = result
        .outputs
        .iter()
        .find(|o| o.path.0 == "b.bin" && o.not_uploaded())
        .unwrap_or_else(|| panic!("{:?}", result.outputs));
    let horde_protocol::messages::OutputLocation::NotUploaded { reason, .. } = &refused.location
    else {
        unreachable!()
    };
    assert!(
        reason.contains("600000 bytes do not fit")
            && reason.contains("total 1048576 bytes")
            && reason.contains("448576 are left"),
        "{reason}"
    );
    // a.bin, unchanged since its mid-session upload: reported once, as sent then.
    reported_once_as_sent(&result, &done.outputs[0]);
}

/// One `POST /outputs` naming files declared in different places (the spec, a volume list)
/// gets one `UploadDone` per place, each with its own outputs (before, only the last was sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outputs_request_across_volume_lists_reports_each_list() {
    let testnet = start(TestnetConfig::default());
    let storage = testnet.storage().unwrap();
    let to_storage = |name: &str| blob_upload(&storage, name);
    let mut request = JobRequest::command("cpu", "/bin/sh");
    // Both files are written at once; they are announced together once the volume list that
    // declares the second has been fetched (its `go` file is there).
    request.args = vec![
        "-c".into(),
        "printf a > \"$HORDE_OUTPUT_DIR/a.bin\"; printf bb > \"$HORDE_OUTPUT_DIR/b.bin\"; \
         python3 -c '\n\
import json, os, time, urllib.request\n\
while not os.path.exists(os.path.join(os.environ[\"HORDE_VOLUME_DIR\"], \"go\")):\n    time.sleep(0.02)\n\
body = json.dumps({\"paths\": [\"a.bin\", \"b.bin\"]}).encode()\n\
request = urllib.request.Request(os.environ[\"HORDE_EXECUTOR_URL\"] + \"/outputs\", data=body, method=\"POST\")\n\
print(\"outputs\", urllib.request.urlopen(request).status, flush=True)\n\
' & exec python3 -m http.server --bind 127.0.0.1 \"$HORDE_JOB_PORT\""
            .into(),
    ];
    request.readiness = ReadinessProbe::Tcp;
    request.uploads = vec![to_storage("a.bin")];
    let (_client, mut job) = submit(&testnet, &request).await;
    endpoint(&mut job, &testnet).await;
    job.send_volumes(
        9,
        vec![VolumeSpec {
            path: RelativePath("go".into()),
            source: VolumeSource::Inline { bytes: vec![1] },
        }],
        vec![to_storage("b.bin")],
    )
    .await
    .unwrap();
    let mut done = Vec::new();
    while done.len() < 2 {
        let upload = next_upload_done(&mut job, "one for each list").await;
        let names: Vec<String> = upload.outputs.iter().map(|o| o.path.0.clone()).collect();
        done.push((upload.volume_msg_id, names));
    }
    done.sort();
    assert_eq!(
        done,
        [
            (None, vec!["a.bin".to_owned()]),
            (Some(9), vec!["b.bin".to_owned()])
        ]
    );
    job.terminate().await.unwrap();
    job.wait_for_end().await.unwrap();
}

/// One `POST /outputs` whose second file does not fit what the job may still upload: the first
/// is sent and reported (`UploadDone`) and at the job's end reported once, as sent; the second
/// is refused, 413 (before, the whole request was refused and the first, sent and counted, was
/// reported not uploaded and sent again at the end, where it no longer fit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_file_does_not_undo_the_files_sent_before_it() {
    let (testnet, storage) = small_outputs_testnet();
    let to_storage = |name: &str| blob_upload(&storage, name);
    let mut request = JobRequest::command("small-outputs", "/bin/sh");
    request.args = vec![
        "-c".into(),
        "python3 -c '\n\
import json, os, urllib.error, urllib.request\n\
for name in (\"a.bin\", \"b.bin\"):\n    open(os.path.join(os.environ[\"HORDE_OUTPUT_DIR\"], name), \"wb\").write(b\"x\" * 600000)\n\
body = json.dumps({\"paths\": [\"a.bin\", \"b.bin\"]}).encode()\n\
request = urllib.request.Request(os.environ[\"HORDE_EXECUTOR_URL\"] + \"/outputs\", data=body, method=\"POST\")\n\
try:\n    status = urllib.request.urlopen(request).status\n\
except urllib.error.HTTPError as error:\n    status = error.code\n\
print(\"outputs\", status, flush=True)\n\
' & exec python3 -m http.server --bind 127.0.0.1 \"$HORDE_JOB_PORT\""
            .into(),
    ];
    request.readiness = ReadinessProbe::Tcp;
    request.uploads = vec![to_storage("a.bin"), to_storage("b.bin")];
    let (_client, mut job) = submit(&testnet, &request).await;
    endpoint(&mut job, &testnet).await;
    let done = next_upload_done(&mut job, "a.bin's").await;
    let names: Vec<&str> = done.outputs.iter().map(|o| o.path.0.as_str()).collect();
    assert_eq!(names, ["a.bin"]);
    let result = terminated_with_an_upload_failed(&mut job).await;
    assert!(
        result.stdout_tail.contains("outputs 413"),
        "{:?}",
        result.stdout_tail
    );
    reported_once_as_sent(&result, &done.outputs[0]);
    assert!(
        result
            .outputs
            .iter()
            .any(|o| o.path.0 == "b.bin" && o.not_uploaded()),
        "{:?}",
        result.outputs
    );
}
