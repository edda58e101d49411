//! The container runner through a real testnet: the demo job as an image (built from local
//! files, `horde_testnet::image`) through the whole flow, and a miner SIGKILLed mid-job leaving
//! none of its executors' containers.
//!
//! These need a container engine (Docker Engine, or Podman's service, at `DOCKER_HOST` or the
//! standard socket): each fails with a message saying so when none answers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on any error.

use std::time::{Duration, Instant};

use horde_node::client::{Client, JobRequest};
use horde_protocol::{JobId, Program, SecretKey};
use horde_testnet::{Runtime, Testnet, TestnetConfig, demo, image};

/// How long a miner's executors' containers may outlive the miner (issue 15).
const GONE_WITHIN: Duration = Duration::from_secs(5);

/// The demo job's image, or a panic saying an engine is needed.
async fn demo_image() -> String {
    image::demo_job_image()
        .await
        .unwrap_or_else(|error| panic!("{error:#}"))
}

/// Polls until no container of `jobs` is left; how long that took, or `None` past `within`.
async fn until_gone(jobs: &[JobId], within: Duration) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let mut left = 0;
        for job in jobs {
            left += image::job_containers(*job).await.unwrap().len();
        }
        if left == 0 {
            return Some(started.elapsed());
        }
        if started.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `horde-testnet demo --runtime container`, as the command runs it: HTTP, SSE, WebSocket, a
/// volume list and an upload mid-session, terminate, the logs read back, every receipt
/// verified; and the job's container removed after its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_as_a_container_image_through_the_whole_flow() {
    let reference = demo_image().await;
    let testnet = Testnet::start(TestnetConfig {
        runtime: Runtime::Container,
        ..TestnetConfig::default()
    })
    .expect("testnet starts");
    let mut out = Vec::new();
    let program = Program::Image {
        reference: reference.clone(),
    };
    let report = demo::run_demo_with(&testnet, program, &mut out).await;
    let printed = String::from_utf8_lossy(&out);
    let report = report.unwrap_or_else(|e| panic!("{e:#}\n{printed}"));
    assert_eq!(report.statuses, horde_testnet::demo::DEMO_STATUSES);
    assert!(printed.contains(&format!("image {reference}")), "{printed}");
    assert!(printed.contains("demo complete"), "{printed}");
    // The executor removes the container once the job has ended.
    assert!(
        until_gone(&[report.job_id], Duration::from_secs(30))
            .await
            .is_some(),
        "the job's container outlived the job by 30 s"
    );
}

/// Issue 15: a miner SIGKILLed while its executors run jobs in containers leaves none of those
/// containers within 5 s (the miner's death ends its executors, each executor's death its
/// container guard's wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_miner_leaves_none_of_its_executors_containers() {
    let reference = demo_image().await;
    let mut testnet = Testnet::start(TestnetConfig {
        runtime: Runtime::Container,
        executors_per_miner: 2,
        prewarm: 2,
        storage: 0,
        ..TestnetConfig::default()
    })
    .expect("testnet starts");
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let mut request = JobRequest::command("cpu", "");
    request.program = Program::Image { reference };
    let mut jobs = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..2 {
        let mut job = client.submit(&request).await.unwrap();
        job.wait_for_endpoint().await.unwrap();
        jobs.push(job.job_id());
        handles.push(job);
    }
    for job in &jobs {
        assert_eq!(
            image::job_containers(*job).await.unwrap().len(),
            1,
            "job {job} runs"
        );
    }
    testnet.kill("miner-0").unwrap();
    let gone = until_gone(&jobs, GONE_WITHIN).await;
    let gone = gone.unwrap_or_else(|| {
        panic!(
            "containers outlived their miner by {GONE_WITHIN:?}:\n{}",
            testnet.log("miner-0")
        )
    });
    println!("every container gone {gone:?} after the miner's SIGKILL");
}
