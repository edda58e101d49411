//! What clients see across a facilitator restart and when it has no miner for them: a running
//! job survives the restart (kill -9 or graceful), its tunnel works throughout and its statuses
//! resume; while the restarted facilitator is still learning the network it says so
//! (`WarmingUp`) and clients retry within the reservation deadline, instead of a `NoMiner` that
//! reads like a fact; a class whose executors are all busy is `AllBusy`, not `NoMiner`; a
//! facilitator whose disk is full refuses jobs with why, and serves again once there is room.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::time::{Duration, Instant};

use horde_node::client::{Client, ClientError, JobConnection, JobHandle, JobRequest};
use horde_protocol::messages::RejectReason;
use horde_protocol::{ExecutorClass, JobStatus, RelativePath, SecretKey, VolumeSource, VolumeSpec};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};
use horde_transport::test_utils::SmallDisk;
use horde_transport::tunnel::http_request;

fn demo_request() -> JobRequest {
    let program = demo_job_binary().expect("demo job binary");
    JobRequest::command("cpu", program.to_str().expect("utf-8 path"))
}

fn start(config: TestnetConfig) -> Testnet {
    Testnet::start(config).expect("testnet starts")
}

fn rejections(job: &JobHandle) -> Vec<JobStatus> {
    job.history()
        .iter()
        .filter(|update| matches!(update.status, JobStatus::Rejected(_)))
        .map(|update| update.status.clone())
        .collect()
}

/// Item 3 of issue 16: after a kill -9 the facilitator knows no miner for seconds. A job whose
/// reservation deadline is shorter than that ends `WarmingUp` (never `NoMiner`); a job with room
/// to wait is submitted again by the client until the facilitator knows the miner, and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_facilitator_says_warming_up_and_clients_retry_until_it_knows_a_miner() {
    let mut testnet = start(TestnetConfig::default());
    testnet.kill("facilitator").unwrap();
    // A facilitator restarted with its kept directory knows the network at once (discovery
    // reloads it from disk); one that lost it (a new disk, a new host) is still learning.
    let kept = testnet
        .dir()
        .join("facilitator")
        .join("data")
        .join(horde_node::server::discovery::DIRECTORY_FILE);
    match std::fs::remove_file(&kept) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            panic!("{}: {error}", kept.display())
        }
        _ => {}
    }
    testnet.start_again("facilitator").unwrap();
    let restarted = Instant::now();
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();

    let mut short = demo_request();
    short.deadlines.reservation_ms = 200;
    let mut job = client.submit(&short).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .expect("a refusal, not a running job")
        .unwrap();
    match &end {
        JobStatus::Rejected(RejectReason::WarmingUp { retry_after_ms }) => {
            assert!(*retry_after_ms > 0 && *retry_after_ms <= 1000, "{end:?}");
        }
        other => panic!(
            "expected WarmingUp {:?} after the restart, got {other:?}\nfacilitator:\n{}",
            restarted.elapsed(),
            testnet.log("facilitator")
        ),
    }

    // Without its kept directory the facilitator hears of each node by that node's next
    // re-publication (every 90 s by default): a reservation longer than that always sees both.
    let mut patient = demo_request();
    patient.deadlines.reservation_ms = 110_000;
    let mut job = client.submit(&patient).await.unwrap();
    let endpoint = tokio::time::timeout(Duration::from_secs(150), job.wait_for_endpoint())
        .await
        .expect("the job gets its endpoint");
    assert!(
        endpoint.is_ok(),
        "{endpoint:?}\nhistory: {:?}\nfacilitator:\n{}",
        job.history(),
        testnet.log("facilitator")
    );
    assert_eq!(rejections(&job), Vec::<JobStatus>::new());
    eprintln!(
        "endpoint {:?} after the facilitator's restart",
        restarted.elapsed()
    );
    job.terminate().await.unwrap();
    job.wait_for_end().await.unwrap();
}

/// Item 3 of issue 16: a miner that offers the class but whose one executor is taken makes a
/// second job `AllBusy { class, executors: 1 }`; a class nobody offers stays `NoMiner`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_executors_busy_is_not_no_miner() {
    let testnet = start(TestnetConfig::default());
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let mut first = client.submit(&demo_request()).await.unwrap();
    first.wait_for_endpoint().await.unwrap();

    // The miner's record says it is full within its capacity coalescing and a gossip hop; until
    // then the facilitator may still offer it the job, which its miner declines. Ask again
    // until the facilitator's own answer comes.
    let mut end = None;
    for _ in 0..20 {
        let mut second = client.submit(&demo_request()).await.unwrap();
        let status = second.wait_for_end().await.unwrap();
        if matches!(status, JobStatus::Rejected(RejectReason::Declined(_))) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        end = Some(status);
        break;
    }
    let end = end.expect("the facilitator learns the miner is full");
    assert_eq!(
        end,
        JobStatus::Rejected(RejectReason::AllBusy {
            class: ExecutorClass("cpu".into()),
            executors: 1,
        })
    );

    let mut nobody = demo_request();
    nobody.executor_class = ExecutorClass("gpu-none".into());
    let mut third = client.submit(&nobody).await.unwrap();
    assert_eq!(
        third.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::NoMiner)
    );
    first.terminate().await.unwrap();
    first.wait_for_end().await.unwrap();
}

/// `GET /health` through the job's tunnel, receipt verified.
async fn health(connection: &JobConnection) -> u16 {
    http_request(&connection.tunnel, "GET", "/health", b"")
        .await
        .unwrap_or_else(|error| panic!("GET /health through the tunnel: {error}"))
        .status
}

/// A testnet with a demo job running and its tunnel answering.
async fn running_demo_job() -> (Testnet, JobHandle, JobConnection) {
    let testnet = start(TestnetConfig::default());
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let mut job = client.submit(&demo_request()).await.unwrap();
    let endpoint = job.wait_for_endpoint().await.unwrap();
    let connection = job.connect_job(&endpoint).await.unwrap();
    assert_eq!(health(&connection).await, 200);
    (testnet, job, connection)
}

/// Item 2 of issue 16: a running job survives its facilitator's restart, mid-tunnel. The tunnel
/// works during the outage; a volume list sent during it is delivered after (or refused with a
/// typed error, never lost); statuses resume on the same handle, each once and in order; the
/// job is still terminated through the restarted facilitator.
async fn a_job_survives_a_facilitator_restart(graceful: bool) {
    let (mut testnet, mut job, connection) = running_demo_job().await;

    if graceful {
        testnet.stop("facilitator").unwrap();
    } else {
        testnet.kill("facilitator").unwrap();
    }
    let down = Instant::now();
    assert_eq!(
        health(&connection).await,
        200,
        "the tunnel works during the outage"
    );
    let volumes = vec![VolumeSpec {
        path: RelativePath("during/outage.txt".into()),
        source: VolumeSource::Inline {
            bytes: b"sent while the facilitator was down".to_vec(),
        },
    }];
    // Sent while the facilitator is down; it comes back half a second later.
    let (sent, restarted) = tokio::join!(job.send_volumes(7, volumes, Vec::new()), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::task::block_in_place(|| testnet.start_again("facilitator"))
    });
    restarted.unwrap();
    eprintln!("facilitator down for {:?}", down.elapsed());
    match sent {
        Ok(()) => {
            let fetched = tokio::time::timeout(
                Duration::from_secs(60),
                job.wait_for(|status| {
                    matches!(status, JobStatus::VolumesFetched { volume_msg_id: 7 })
                }),
            )
            .await
            .expect("statuses resume after the restart");
            assert!(
                fetched.is_ok(),
                "{fetched:?}\nhistory: {:?}\nfacilitator:\n{}\nvalidator:\n{}",
                job.history(),
                testnet.log("facilitator"),
                testnet.log("validator-0")
            );
        }
        Err(ClientError::Channel(error)) => {
            eprintln!("volume list refused with a typed error: {error}")
        }
        Err(other) => panic!("volume list during the outage: {other}"),
    }
    eprintln!(
        "statuses resumed {:?} after the facilitator went down",
        down.elapsed()
    );
    assert_eq!(
        health(&connection).await,
        200,
        "the tunnel works after the restart"
    );

    job.terminate().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .expect("the job ends once terminated")
        .unwrap();
    assert!(
        matches!(&end, JobStatus::Completed(result) if result.terminated),
        "{end:?}\nfacilitator:\n{}",
        testnet.log("facilitator")
    );
    let history = job.history();
    for (index, update) in history.iter().enumerate() {
        assert_eq!(update.seq as usize, index, "{history:?}");
    }
    assert!(
        !history
            .iter()
            .any(|update| matches!(update.status, JobStatus::HordeFailed(_))),
        "{history:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_survives_its_facilitator_killed_mid_tunnel() {
    a_job_survives_a_facilitator_restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_survives_a_graceful_facilitator_restart_mid_tunnel() {
    a_job_survives_a_facilitator_restart(true).await;
}

/// A job that ends while its facilitator is down (kill -9) keeps its real outcome. The
/// validator's last status goes into the stream of the dead facilitator, which accepts writes
/// until the loss is noticed; the validator holds the job open until the facilitator
/// acknowledges that stream, and a restarted facilitator resuming the job gets what was written
/// to it again (dropping what it had recorded). Before, the job's end was lost and the restarted
/// facilitator recorded `HordeFailed` ("validator no longer drives the job").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_ends_while_its_facilitator_is_down_keeps_its_outcome() {
    let (mut testnet, mut job, connection) = running_demo_job().await;

    testnet.kill("facilitator").unwrap();
    // The job exits by itself (through its tunnel, which does not need the facilitator).
    let exit = http_request(&connection.tunnel, "GET", "/exit?code=0", b"")
        .await
        .unwrap();
    assert_eq!(exit.status, 200);
    // Long enough for its end to travel executor → miner → validator → the dead stream.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::block_in_place(|| testnet.start_again("facilitator")).unwrap();

    let end = tokio::time::timeout(Duration::from_secs(60), job.wait_for_end())
        .await
        .expect("the job's end arrives after the restart")
        .unwrap();
    assert!(
        matches!(&end, JobStatus::Completed(result) if !result.terminated && result.exit_code == Some(0)),
        "{end:?}\nhistory: {:?}\nfacilitator:\n{}\nvalidator:\n{}",
        job.history(),
        testnet.log("facilitator"),
        testnet.log("validator-0")
    );
    // Each status once, in order: what the validator sent again was not recorded twice.
    let history = job.history();
    for (index, update) in history.iter().enumerate() {
        assert_eq!(update.seq as usize, index, "{history:?}");
    }
    let endpoints = history
        .iter()
        .filter(|update| matches!(update.status, JobStatus::EndpointReady(_)))
        .count();
    assert_eq!(endpoints, 1, "{history:?}");
}

/// A testnet whose facilitator keeps its data on a 16 MiB tmpfs (`None` unless root).
fn facilitator_on_a_small_disk() -> Option<(Testnet, SmallDisk)> {
    let mut testnet = start(TestnetConfig::default());
    testnet.kill("facilitator").unwrap();
    let data = testnet.dir().join("facilitator").join("data");
    let disk = SmallDisk::mount_over(&data, 16 << 20)?;
    testnet.start_again("facilitator").unwrap();
    Some((testnet, disk))
}

/// Submits jobs until one is refused (the disk full): each the store can still place in pages
/// it has is recorded; the first it cannot is refused, with why. The refusal and the jobs
/// recorded before it.
async fn submit_until_refused(
    client: &Client,
    request: &JobRequest,
) -> (RejectReason, Vec<JobHandle>) {
    let mut recorded = Vec::new();
    for _ in 0..200 {
        let mut job = client.submit(request).await.unwrap();
        let status = job
            .wait_for(|s| matches!(s, JobStatus::Rejected(_) | JobStatus::Received))
            .await
            .unwrap();
        if let JobStatus::Rejected(reason) = status {
            return (reason, recorded);
        }
        recorded.push(job);
    }
    panic!("no job refused while the disk is full");
}

/// The facilitator's data directory full: a submission it cannot record is refused with why
/// (`StoreFailed`: nothing runs, so the client may submit again), never a bare stream reset;
/// once there is room the same facilitator, not restarted, records and serves jobs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_facilitator_on_a_full_disk_refuses_jobs_with_why_and_serves_again_once_there_is_room() {
    let Some((testnet, disk)) = facilitator_on_a_small_disk() else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let mut first = client.submit(&demo_request()).await.unwrap();
    first.wait_for_endpoint().await.unwrap();
    first.terminate().await.unwrap();
    first.wait_for_end().await.unwrap();

    let filler = disk.fill("filler");
    let (refused, recorded) = submit_until_refused(&client, &demo_request()).await;
    let RejectReason::StoreFailed(why) = &refused else {
        panic!("{refused:?}")
    };
    assert!(why.contains("No space left on device"), "{why}");
    assert!(
        horde_node::client::describe::rejection(&refused).contains("nothing runs"),
        "{refused:?}"
    );

    // Room again: the same facilitator process records the next job and it runs (once the
    // one recorded before the refusal that got the executor has ended, and the miner's
    // capacity record says so).
    std::fs::remove_file(&filler).unwrap();
    for mut job in recorded {
        if job.terminate().await.is_ok() {
            let _ = job.wait_for_end().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut again = None;
    for _ in 0..40 {
        let mut job = client.submit(&demo_request()).await.unwrap();
        match job.wait_for_endpoint().await {
            Ok(_) => {
                again = Some(job);
                break;
            }
            Err(ClientError::JobEnded(status))
                if matches!(
                    *status,
                    JobStatus::Rejected(RejectReason::AllBusy { .. } | RejectReason::Declined(_))
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => panic!("{error}"),
        }
    }
    let mut again = again.expect("the executor free again");
    again.terminate().await.unwrap();
    again.wait_for_end().await.unwrap();
}

/// A job that runs while the facilitator's disk fills: its client still hears every status
/// (its end included) as it comes, and once there is room the same facilitator records them,
/// so a client attaching later reads the whole history from the store. Before, each status the
/// store refused was dropped: the client waited for an end that never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_when_the_facilitators_disk_fills_still_reaches_its_client() {
    let Some((mut testnet, disk)) = facilitator_on_a_small_disk() else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let key = SecretKey::generate();
    let client = Client::new(key.clone(), testnet.facilitator()).unwrap();
    let mut job = client.submit(&demo_request()).await.unwrap();
    job.wait_for_endpoint().await.unwrap();

    // Fill the disk, and keep submitting large jobs (256 KiB specs) as other clients would:
    // each the store cannot fit fails its write, and it closes the database, opened again at
    // most once a second, so the running job's statuses meet a store that refuses them.
    let filler = disk.fill("filler");
    let mut large = demo_request();
    large.volumes = vec![VolumeSpec {
        path: RelativePath("pad.bin".into()),
        source: VolumeSource::Inline {
            bytes: vec![7; 256 << 10],
        },
    }];
    let (refused, _recorded) = submit_until_refused(&client, &large).await;
    assert!(
        matches!(refused, RejectReason::StoreFailed(_)),
        "{refused:?}"
    );
    let others = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let flood = tokio::spawn(async move {
        loop {
            match others.submit(&large).await {
                Ok(mut job) => {
                    let _ = job.wait_for(|s| !matches!(s, JobStatus::Received)).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let log = testnet.dir().join("facilitator/node.log");
    let refusals = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("job store failed; job refused")
            .count()
    };
    let before = refusals();
    let deadline = Instant::now() + Duration::from_secs(60);
    while refusals() < before + 3 {
        assert!(Instant::now() < deadline, "the store did not keep refusing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    job.terminate().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .expect("the job's end reached its client while the disk was full")
        .unwrap();
    flood.abort();
    assert!(matches!(end, JobStatus::Completed(_)), "{end:?}");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("could not store status; sent to the job's clients"),
        "the store took every status: the test did not fill the disk"
    );
    let seen = job.history().to_vec();

    // Room again: what waited is stored, under the numbers the client got; the job's driver
    // ends once it is. Read back through a restarted facilitator: from the store alone.
    std::fs::remove_file(&filler).unwrap();
    let short = job.job_id().fmt_short().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .any(|line| line.contains(&short) && line.contains("job session over"))
    {
        assert!(Instant::now() < deadline, "the job's driver never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("status stored after the store failed"),
        "{said}"
    );
    assert!(!said.contains("never took"), "{said}");
    testnet.kill("facilitator").unwrap();
    testnet.start_again("facilitator").unwrap();
    let client = Client::new(key, testnet.facilitator()).unwrap();
    let mut attached = client.attach(job.job_id(), None).await.unwrap();
    let end = attached.wait_for_end().await.unwrap();
    assert!(matches!(end, JobStatus::Completed(_)), "{end:?}");
    assert_eq!(attached.history(), seen.as_slice());
}
