//! The control plane end to end across real processes, with a shell-started HTTP server as job.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use horde_node::client::{Client, JobConnection, JobRequest};
use horde_protocol::{JobStatus, ReadinessProbe, SecretKey};
use horde_testnet::{Testnet, TestnetConfig};

fn python_job() -> JobRequest {
    let mut request = JobRequest::command("cpu", "/bin/sh");
    request.args = vec![
        "-c".into(),
        "exec python3 -m http.server --bind 127.0.0.1 \"$HORDE_JOB_PORT\"".into(),
    ];
    request.readiness = ReadinessProbe::Http { path: "/".into() };
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_submit_to_endpoint_to_terminate() {
    let testnet = Testnet::start(TestnetConfig::default()).expect("testnet starts");
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let mut job = client.submit(&python_job()).await.unwrap();
    let endpoint = match job.wait_for_endpoint().await {
        Ok(endpoint) => endpoint,
        Err(error) => panic!(
            "{error}\nhistory: {:?}\nminer log:\n{}\nvalidator log:\n{}",
            job.history(),
            testnet.log("miner-0"),
            testnet.log("validator-0")
        ),
    };
    let connection =
        JobConnection::connect(job.job_id(), job.client_key().unwrap().clone(), &endpoint)
            .await
            .unwrap();
    let response = horde_transport::tunnel::http_request(&connection.tunnel, "GET", "/", b"")
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    job.terminate().await.unwrap();
    let end = job.wait_for_end().await.unwrap();
    assert!(
        matches!(end, JobStatus::Completed(ref f) if f.terminated),
        "{end:?}"
    );
    let kinds: Vec<String> = job
        .history()
        .iter()
        .map(|u| {
            format!("{:?}", u.status)
                .split(['(', ' ', '{'])
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Received",
            "Assigned",
            "Accepted",
            "ExecutorReady",
            "EndpointReady",
            "Completed"
        ]
    );
}

/// The README's demo, exactly as `horde-testnet demo` runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_passes() {
    let testnet = Testnet::start(TestnetConfig::default()).expect("testnet starts");
    let mut out = Vec::new();
    let report = horde_testnet::demo::run_demo(&testnet, &mut out).await;
    let printed = String::from_utf8_lossy(&out);
    let report = report.unwrap_or_else(|e| panic!("{e}\n{printed}"));
    assert_eq!(report.statuses, horde_testnet::demo::DEMO_STATUSES);
    assert!(printed.contains("demo complete"), "{printed}");
}

/// Issue 16, item 12: stopping a testnet stops its own `horde` processes and nothing else that
/// happens to name its directory (the harness's own command, a terminal multiplexer).
#[test]
fn shutdown_leaves_other_processes_that_name_the_directory_alone() {
    let dir = tempfile::tempdir().unwrap();
    let testnet = Testnet::start(TestnetConfig {
        dir: Some(dir.path().to_owned()),
        storage: 0,
        ..TestnetConfig::default()
    })
    .unwrap();
    // `sh -c 'sleep 600; :' bystander DIR`: a shell whose command line names the directory.
    let mut bystander = std::process::Command::new("sh")
        .args(["-c", "sleep 600; :", "bystander"])
        .arg(dir.path())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        testnet
            .processes()
            .iter()
            .any(|(pid, _)| *pid == bystander.id()),
        "the bystander must name the directory for this test to mean anything"
    );
    let nodes = testnet.node_processes();
    assert!(!nodes.is_empty());
    assert!(nodes.iter().all(|(pid, _)| *pid != bystander.id()));
    testnet.shutdown();
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the bystander was killed"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

/// Issue 16, item 13: a network started again in the same directory keeps every node's key and
/// ports, so saved job state and specs naming them still work.
#[test]
fn a_network_restarted_in_its_directory_keeps_its_keys_and_ports() {
    let dir = tempfile::tempdir().unwrap();
    let config = || TestnetConfig {
        dir: Some(dir.path().to_owned()),
        storage: 0,
        ..TestnetConfig::default()
    };
    let identities = |testnet: &Testnet| {
        testnet
            .nodes()
            .iter()
            .map(|node| (node.name.clone(), node.hotkey, node.addr, node.p2p))
            .collect::<Vec<_>>()
    };
    let first = Testnet::start(config()).unwrap();
    let before = identities(&first);
    first.shutdown();
    let restarted = std::time::Instant::now();
    let second = Testnet::start(config()).unwrap();
    eprintln!("restarted in {:?}", restarted.elapsed());
    assert_eq!(identities(&second), before);
    second.shutdown();
}
