//! Cross-validation across real processes: a job that answers wrongly gets its miner reported,
//! the report is verified and forwarded, the miner is no longer chosen (and a restart keeps it
//! so); forged, foreign, replayed and non-owner reports are refused with their reason; and
//! `on_trusted_miner` jobs run on a trusted miner, against which answers are compared.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use horde_node::client::{
    Client, JobConnection, JobHandle, JobRequest, ReportEvidence, VerifiedEndpoint, byte_equal,
    compare_http, now,
};
use horde_protocol::messages::{RejectReason, ReportVerdict};
use horde_protocol::{
    EndpointRecord, JobId, JobReceipt, JobStatus, MinerReport, NodeAddr, SecretKey, Signature,
    Signed, UpMessage,
};
use horde_testnet::reports::{assign_directly, reconfigure};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};
use horde_transport::tunnel::{HttpResponse, http_request};

fn demo_request(args: &[&str]) -> JobRequest {
    let program = demo_job_binary().expect("demo job binary");
    let mut request = JobRequest::command("cpu", program.to_str().expect("utf-8 path"));
    request.args = args.iter().map(|a| (*a).to_owned()).collect();
    request
}

fn network(validators: usize, miners: usize, executors_per_miner: u32) -> Testnet {
    Testnet::start(TestnetConfig {
        validators,
        miners,
        executors_per_miner,
        storage: 0,
        ..TestnetConfig::default()
    })
    .expect("testnet starts")
}

async fn serving(client: &Client, request: &JobRequest) -> (JobHandle, VerifiedEndpoint) {
    let mut job = client.submit(request).await.unwrap();
    let endpoint = job
        .wait_for_endpoint()
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", job.history()));
    (job, endpoint)
}

async fn echo(connection: &JobConnection, body: &[u8]) -> HttpResponse {
    http_request(&connection.tunnel, "POST", "/echo", body)
        .await
        .unwrap()
}

/// Each of `validators`, handed a job on `miner` directly, refuses it with `MinerNotAllowed`.
async fn assert_every_validator_refuses(validators: &[NodeAddr], miner: &NodeAddr) {
    for validator in validators {
        let (answer, _) = assign_directly(
            validator,
            signed_spec(&SecretKey::generate()),
            miner.clone(),
        )
        .await
        .unwrap();
        assert_eq!(answer, UpMessage::Rejected(RejectReason::MinerNotAllowed));
    }
}

fn refused(verdict: ReportVerdict) -> String {
    match verdict {
        ReportVerdict::Refused(reason) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn signed_spec(account: &SecretKey) -> Signed<horde_protocol::JobSpec> {
    let spec = demo_request(&[]).into_spec(JobId::random(), SecretKey::generate().hotkey(), now());
    Signed::sign(account, &spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_answers_get_the_miner_reported_and_excluded_across_restarts() {
    let mut testnet = network(2, 1, 2);
    let miner = testnet.node("miner-0").unwrap().node_addr();
    let validators: Vec<_> = ["validator-0", "validator-1"]
        .iter()
        .map(|name| testnet.node(name).unwrap().node_addr())
        .collect();

    // Before any report, a validator drives a job on the miner.
    let account = SecretKey::generate();
    let (first, mut control) =
        assign_directly(&validators[1], signed_spec(&account), miner.clone())
            .await
            .unwrap();
    assert_eq!(first, UpMessage::Accepted, "validator accepts the miner");
    control.abort(horde_transport::codes::CANCELLED);

    // A job that answers /echo wrongly.
    let client = Client::new(account, testnet.facilitator()).unwrap();
    let (job, endpoint) = serving(&client, &demo_request(&["--wrong-echo"])).await;
    assert_eq!(job.miner(), Some(miner.hotkey));
    let connection = job.connect_job(&endpoint).await.unwrap();
    let question = b"what is the answer?";
    let answer = echo(&connection, question).await;
    assert_eq!(answer.status, 200);
    assert_ne!(answer.body, question, "the cheating job answers wrongly");

    let evidence = ReportEvidence::new(&endpoint, answer.receipt.clone(), question, &answer.body);
    let report = client.sign_report(evidence, "/echo did not echo");
    let verdict = client.report(&report).await.unwrap();
    assert_eq!(verdict, ReportVerdict::Accepted { forwarded_to: 2 });
    for name in ["validator-0", "validator-1"] {
        assert!(
            testnet.log(name).contains("miner report verified"),
            "{name} verified the report:\n{}",
            testnet.log(name)
        );
    }

    // The facilitator no longer chooses the miner: with no other, a new job finds no miner.
    let mut next = client.submit(&demo_request(&[])).await.unwrap();
    assert_eq!(
        next.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::NoMiner)
    );
    // Every validator refuses to drive a job on it.
    assert_every_validator_refuses(&validators, &miner).await;

    // Restarts keep the exclusion, at the validators and at the facilitator.
    testnet.restart("validator-0").unwrap();
    testnet.restart("validator-1").unwrap();
    testnet.restart("facilitator").unwrap();
    let stored =
        std::fs::read_to_string(testnet.dir().join("validator-0/data/exclusions.json")).unwrap();
    assert!(stored.contains(&miner.hotkey.to_string()), "{stored}");
    assert_every_validator_refuses(&validators, &miner).await;
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let mut after = client.submit(&demo_request(&[])).await.unwrap();
    assert_eq!(
        after.wait_for_end().await.unwrap(),
        JobStatus::Rejected(RejectReason::NoMiner)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_foreign_replayed_and_non_owner_reports_are_refused_with_reasons() {
    let testnet = network(1, 1, 2);
    let account = SecretKey::generate();
    let client = Client::new(account.clone(), testnet.facilitator()).unwrap();
    let (job_a, endpoint_a) = serving(&client, &demo_request(&["--wrong-echo"])).await;
    let (job_b, endpoint_b) = serving(&client, &demo_request(&[])).await;
    let connection_a = job_a.connect_job(&endpoint_a).await.unwrap();
    let connection_b = job_b.connect_job(&endpoint_b).await.unwrap();
    let answer_a = echo(&connection_a, b"ping").await;
    let answer_b = echo(&connection_b, b"ping").await;
    let evidence = |receipt: Signed<JobReceipt>| {
        ReportEvidence::new(&endpoint_a, receipt, b"ping", &answer_a.body)
    };

    // Forged receipt: the job key's name on it, but not its signature.
    let genuine = &answer_a.receipt;
    let forged = Signed::from_parts(
        genuine.bytes().to_vec(),
        *genuine.signer(),
        Signature::from_bytes([7; 64]),
    );
    let reason = refused(
        client
            .report(&client.sign_report(evidence(forged), "x"))
            .await
            .unwrap(),
    );
    assert!(
        reason.starts_with("receipt not signed by the job key"),
        "{reason}"
    );
    // A receipt for job A made up and signed by some other key.
    let content: JobReceipt = genuine.verify().unwrap();
    let made_up = Signed::sign(&SecretKey::generate(), &content);
    let reason = refused(
        client
            .report(&client.sign_report(evidence(made_up), "x"))
            .await
            .unwrap(),
    );
    assert!(
        reason.starts_with("receipt not signed by the job key"),
        "{reason}"
    );

    // Receipt from another job (signed by job B's key).
    let reason = refused(
        client
            .report(&client.sign_report(evidence(answer_b.receipt.clone()), "x"))
            .await
            .unwrap(),
    );
    assert!(
        reason.starts_with("receipt not signed by the job key"),
        "{reason}"
    );

    // Endpoint record signed by another miner (naming itself, with job A's key).
    let other_miner = SecretKey::generate();
    let mut record: EndpointRecord = endpoint_a.record.clone();
    record.miner = other_miner.hotkey();
    let mut other_evidence = evidence(answer_a.receipt.clone());
    other_evidence.endpoint = Signed::sign(&other_miner, &record);
    let reason = refused(
        client
            .report(&client.sign_report(other_evidence, "x"))
            .await
            .unwrap(),
    );
    assert!(
        reason.starts_with("endpoint record not signed by the job's miner"),
        "{reason}"
    );

    // A sound report by a key that does not own the job.
    let stranger = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let reason = refused(
        stranger
            .report(&stranger.sign_report(evidence(answer_a.receipt.clone()), "x"))
            .await
            .unwrap(),
    );
    assert!(reason.starts_with("not the owner of job"), "{reason}");

    // The sound report by the owner is accepted once; its replay, and another report on the same
    // receipt, are refused.
    let report: Signed<MinerReport> =
        client.sign_report(evidence(answer_a.receipt.clone()), "/echo reversed");
    assert_eq!(
        client.report(&report).await.unwrap(),
        ReportVerdict::Accepted { forwarded_to: 1 }
    );
    let reason = refused(client.report(&report).await.unwrap());
    assert!(reason.starts_with("duplicate report"), "{reason}");
    let again = client.sign_report(evidence(answer_a.receipt.clone()), "still reversed");
    let reason = refused(client.report(&again).await.unwrap());
    assert!(reason.starts_with("duplicate report"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_job_runs_on_a_trusted_miner_and_exposes_a_wrong_answer() {
    let mut testnet = network(1, 2, 2);
    let trusted_miner = testnet.node("miner-1").unwrap().hotkey;
    reconfigure(&mut testnet, "validator-0", |config| {
        config.validator.trusted_miners = vec![trusted_miner];
    })
    .unwrap();
    reconfigure(&mut testnet, "facilitator", |config| {
        config.facilitator.trusted_miners = vec![trusted_miner];
    })
    .unwrap();

    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let mut trusted_request = demo_request(&[]);
    trusted_request.on_trusted_miner = true;
    let (trusted_job, trusted_endpoint) = serving(&client, &trusted_request).await;
    assert_eq!(trusted_job.miner(), Some(trusted_miner));
    assert_eq!(trusted_endpoint.record.miner, trusted_miner);

    let (suspect_job, suspect_endpoint) = serving(&client, &demo_request(&["--wrong-echo"])).await;
    let suspect = suspect_job.connect_job(&suspect_endpoint).await.unwrap();
    let reference = trusted_job.connect_job(&trusted_endpoint).await.unwrap();
    let comparison = compare_http(&suspect, &reference, "POST", "/echo", b"abc", byte_equal)
        .await
        .unwrap();
    assert!(!comparison.agree);
    assert_eq!(comparison.trusted.body, b"abc");
    assert_eq!(comparison.answer.body, b"cba");

    let report = client.sign_report(
        comparison.evidence(&suspect_endpoint),
        "differs from trusted",
    );
    assert_eq!(
        client.report(&report).await.unwrap(),
        ReportVerdict::Accepted { forwarded_to: 1 }
    );
}

#[test]
fn cli_reports_a_job_from_its_stored_receipt() {
    let testnet = network(1, 1, 1);
    let horde = horde_testnet::horde_binary().unwrap();
    let state = tempfile::tempdir().unwrap();
    let spec = state.path().join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "executor_class = \"cpu\"\nprogram = \"{}\"\nargs = [\"--wrong-echo\"]\n",
            demo_job_binary().unwrap().display()
        ),
    )
    .unwrap();
    let horde_job = |args: &[&str]| {
        let output = std::process::Command::new(&horde)
            .arg("job")
            .args(args)
            .env("HORDE_STATE_DIR", state.path())
            .env("HORDE_FACILITATOR", testnet.facilitator().to_string())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), stdout, stderr)
    };
    let (ok, stdout, stderr) = horde_job(&["run", "--spec", spec.to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    let job = stdout
        .lines()
        .find_map(|line| line.strip_prefix("job "))
        .unwrap()
        .trim()
        .to_owned();
    let (ok, stdout, stderr) = horde_job(&["request", &job, "POST", "/echo", "--data", "abc"]);
    assert!(ok && stdout.contains("cba"), "{stdout}\n{stderr}");
    let receipts =
        std::fs::read_to_string(state.path().join(format!("jobs/{job}.receipts"))).unwrap();
    let receipt = receipts.lines().last().unwrap();

    let (ok, stdout, stderr) = horde_job(&[
        "report",
        &job,
        "--receipt",
        receipt,
        "--details",
        "/echo answered cba to abc",
    ]);
    assert!(
        ok && stdout.contains("report accepted"),
        "{stdout}\n{stderr}"
    );
    // The same receipt again is a duplicate, refused with its reason.
    let (ok, stdout, stderr) = horde_job(&["report", &job, "--details", "again"]);
    assert!(
        !ok && stderr.contains("duplicate report"),
        "{stdout}\n{stderr}"
    );
}
