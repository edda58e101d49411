//! The container runner at its edges, against a real engine (Docker Engine or Podman's service
//! on `DOCKER_HOST` / the standard socket): a job that calls its executor in its first
//! instruction, and an engine that goes away while a job runs.
//!
//! Each test fails with a clear message when no engine answers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on any error.

#[path = "support/engine.rs"]
mod engine;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use horde_node::server::executor::runner::container::{ContainerConfig, ContainerRunner};
use horde_node::server::executor::runner::{JobEvent, Runner as _, RunnerError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use self::engine::{image_program, job_dir, launch, policy, remove, runner};

/// Reads one HTTP request's head and body (up to `marker`) from `stream`; answers 200.
async fn answer_outputs(stream: &mut tokio::net::TcpStream, marker: &str) -> String {
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&request).contains(marker) {
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(n > 0, "the outputs request ended early");
        request.extend_from_slice(&buffer[..n]);
    }
    stream
        .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    String::from_utf8_lossy(&request).into_owned()
}

/// The job's first instruction is a POST to its executor, made once, with no retry: it must
/// be answered every time. (Before the start gate, the outputs endpoint opened a few
/// milliseconds after the job's command started, and such a POST was refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reaches_its_executor_in_its_first_instruction() {
    const STARTS: usize = 20;
    let runner = runner().await;
    let script = r#"exec wget -q -O - --post-data=first "$HORDE_EXECUTOR_URL/outputs""#;
    let mut refused = Vec::new();
    let started = Instant::now();
    for attempt in 0..STARTS {
        let dir = job_dir();
        let launch = launch(dir.path(), image_program(), script, policy());
        let id = launch.job_id;
        let mut job = match runner.start(launch).await {
            Ok(job) => job,
            // Refused so early that the job ended before the runner was done starting it.
            Err(RunnerError::ExitedAtOnce(exit)) => {
                println!("attempt {attempt}: the job ended unanswered at once: {exit:?}");
                refused.push(attempt);
                assert!(engine::containers_of(id).await.is_empty(), "left behind");
                continue;
            }
            Err(error) => panic!("{error}"),
        };
        let outputs = match tokio::time::timeout(Duration::from_secs(10), job.next_event())
            .await
            .expect("neither a POST nor an exit within 10 s")
        {
            JobEvent::Outputs(stream) => Some(stream),
            JobEvent::Exited(exit) => {
                println!("attempt {attempt}: the job ended unanswered: {exit:?}");
                None
            }
        };
        match outputs {
            Some(mut stream) => {
                let request = answer_outputs(&mut stream, "first").await;
                assert!(request.starts_with("POST /outputs "), "{request}");
                drop(stream);
                let exit = tokio::time::timeout(Duration::from_secs(10), job.wait())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(exit.code, Some(0), "wget saw the answer");
            }
            None => refused.push(attempt),
        }
        let stderr = std::fs::read_to_string(dir.path().join("logs/output/stderr")).unwrap();
        if !stderr.is_empty() {
            println!("attempt {attempt}: stderr {stderr}");
        }
        remove(job, id).await;
    }
    println!("{STARTS} starts in {:?}", started.elapsed());
    assert!(
        refused.is_empty(),
        "the first POST was refused in attempts {refused:?} of {STARTS}"
    );
}

/// A unix-socket forwarder in front of the engine's socket: the engine the runner sees, which
/// the test can cut (every connection closed, new ones refused, as when an engine stops or its
/// socket goes away) and restore, without touching the real engine.
struct EngineProxy {
    dir: tempfile::TempDir,
    target: PathBuf,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl EngineProxy {
    fn start() -> Self {
        let address = engine::engine_address();
        let target = PathBuf::from(address.strip_prefix("unix://").unwrap_or(&address));
        let mut proxy = Self {
            dir: tempfile::tempdir().unwrap(),
            target,
            server: None,
        };
        proxy.restore();
        proxy
    }

    fn address(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("engine.sock")
    }

    /// Listens again (after [`Self::cut`]).
    fn restore(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let listener = tokio::net::UnixListener::bind(self.socket()).unwrap();
        let target = self.target.clone();
        self.server = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                connections.spawn(async move {
                    if let Ok(mut engine) = tokio::net::UnixStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
            // Dropping the set (when this task is aborted) closes every forwarded connection.
        }));
    }

    /// Closes every connection and the socket: the engine is gone.
    async fn cut(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
        let _ = std::fs::remove_file(self.socket());
    }
}

/// The engine goes away while a job runs: the job ends with a typed "engine unavailable"
/// error at once, nothing of it keeps running (killed without the engine), a job started
/// meanwhile is refused with the same typed error, and once the engine is back the runner
/// removes what it left there and runs jobs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_goes_away_mid_job_fails_it_typed_and_leaves_nothing() {
    engine::test_image();
    let mut proxy = EngineProxy::start();
    let config = ContainerConfig {
        engine: Some(proxy.address()),
        guard_program: PathBuf::from(env!("CARGO_BIN_EXE_horde")),
    };
    let runner = ContainerRunner::start(config).await.unwrap();

    let marker = format!("4321{}7", std::process::id());
    let dir = job_dir();
    let script = format!("sleep {marker} & exec httpd -f -p $HORDE_JOB_PORT -h /tmp");
    let launch1 = launch(dir.path(), image_program(), &script, policy());
    let id = launch1.job_id;
    let mut job = runner.start(launch1).await.unwrap();
    engine::until_ready(job.as_ref()).await;
    assert!(engine::host_process_with(&marker), "the job runs");

    proxy.cut().await;
    let cut = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(5), job.wait())
        .await
        .expect("the job's end was not reported within 5 s of the engine going away")
        .expect_err("an exit status from an engine that is gone");
    let lost = Instant::now() - cut;
    let typed = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Arc<RunnerError>>())
        .unwrap_or_else(|| panic!("an untyped error: {error}"));
    assert!(
        matches!(**typed, RunnerError::EngineUnavailable { .. }),
        "{typed}"
    );
    println!("engine gone: job lost after {lost:?}: {error}");

    // Stopped without the engine: nothing of the job runs.
    let stopping = Instant::now();
    assert_eq!(job.stop(Duration::from_secs(1)).await, None);
    while engine::host_process_with(&marker) {
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "the job's processes outlived the engine's loss by 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "job's processes gone {:?} after the stop",
        stopping.elapsed()
    );

    // A job started meanwhile: refused, typed, at once.
    let dir2 = job_dir();
    let refused_at = Instant::now();
    let error = tokio::time::timeout(
        Duration::from_secs(5),
        runner.start(launch(dir2.path(), image_program(), "true", policy())),
    )
    .await
    .expect("a start against a gone engine hung")
    .unwrap_err();
    assert!(
        matches!(error, RunnerError::EngineUnavailable { .. }),
        "{error}"
    );
    println!("start refused in {:?}: {error}", refused_at.elapsed());

    // The engine comes back: what the job left there is removed, and jobs run again.
    job.remove().await;
    proxy.restore();
    let restored = Instant::now();
    while !engine::containers_of(id).await.is_empty() {
        assert!(
            restored.elapsed() < Duration::from_secs(10),
            "the lost job's container was not removed within 10 s of the engine's return"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "container removed {:?} after the engine came back",
        restored.elapsed()
    );
    let dir3 = job_dir();
    let launch3 = launch(dir3.path(), image_program(), "exit 4", policy());
    let exit = engine::run_to_exit(&runner, launch3).await;
    assert_eq!(exit.code, Some(4));
    proxy.cut().await;
}
