//! Discovery across real `horde node` processes that join with `--role … --bootstrap …`: a late
//! joiner is discovered and used, a node that leaves is no longer chosen once its record expires,
//! forged records sent to the facilitator are dropped, a facilitator killed and restarted has its
//! directory back within a second.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::time::{Duration, Instant};

use horde_node::client::{Client, JobRequest, now};
use horde_node::server::discovery::{BootstrapPeer, exchange};
use horde_protocol::{
    ClassCapacity, ExecutorClass, Hotkey, JobStatus, NodeRecord, RecordSync, Role, SecretKey,
    Signature, Signed,
};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};

/// Record lifetime for this test: short, so a departure shows within seconds.
const TTL_SECS: u64 = 3;

fn demo_request() -> JobRequest {
    let program = demo_job_binary().unwrap();
    JobRequest::command("cpu", program.to_str().unwrap())
}

/// Submits a job, waits until it is assigned, and returns the miner it went to; the job is
/// then run to its endpoint and terminated so the executor is free again.
async fn run_job(client: &Client, testnet: &Testnet) -> Hotkey {
    let mut job = client.submit(&demo_request()).await.unwrap();
    if let Err(error) = job.wait_for_endpoint().await {
        panic!(
            "{error}\nhistory: {:?}\nfacilitator:\n{}",
            job.history(),
            testnet.log("facilitator")
        );
    }
    let miner = job.miner().unwrap();
    job.terminate().await.unwrap();
    let end = job.wait_for_end().await.unwrap();
    assert!(matches!(end, JobStatus::Completed(_)), "{end:?}");
    miner
}

fn knows(testnet: &Testnet, observer: &str, hotkey: &Hotkey) -> bool {
    testnet
        .known_by(observer)
        .unwrap()
        .iter()
        .any(|r| r.hotkey == *hotkey)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_is_used_leaver_expires_forgeries_are_dropped() {
    let mut testnet = Testnet::start(TestnetConfig {
        storage: 0,
        record_ttl_secs: Some(TTL_SECS),
        ..TestnetConfig::default()
    })
    .unwrap();
    assert!(testnet.converged_in().is_some());
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let first = testnet.node("miner-0").unwrap().hotkey;
    assert_eq!(run_job(&client, &testnet).await, first);

    // A miner joins late, through the facilitator, with only `--bootstrap` to go on.
    let name = testnet.add_node(Role::Miner).unwrap();
    let late = testnet.node(&name).unwrap().hotkey;
    assert!(knows(&testnet, "facilitator", &late));
    assert!(knows(&testnet, "validator-0", &late));
    // Its record carries its capacity.
    let record = testnet
        .known_by("facilitator")
        .unwrap()
        .into_iter()
        .find(|r| r.hotkey == late)
        .unwrap();
    assert_eq!(record.role, Role::Miner);
    assert_eq!(record.capacity[0].class, ExecutorClass("cpu".into()));
    // The facilitator spreads jobs over the miners it knows: the late joiner gets some.
    let mut miners = Vec::new();
    for _ in 0..4 {
        miners.push(run_job(&client, &testnet).await);
    }
    assert!(
        miners.contains(&late),
        "late joiner never chosen: {miners:?}"
    );
    assert!(
        miners.contains(&first),
        "first miner never chosen: {miners:?}"
    );

    // The first miner leaves without a word (SIGKILL): its record expires everywhere.
    testnet.kill("miner-0").unwrap();
    let killed = Instant::now();
    while knows(&testnet, "facilitator", &first) || knows(&testnet, "validator-0", &first) {
        assert!(
            killed.elapsed() < Duration::from_secs(TTL_SECS + 5),
            "miner-0 still listed {:?} after it died",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(killed.elapsed() <= Duration::from_secs(TTL_SECS + 2));
    // From then on every job goes to the miner that is still there, and succeeds.
    for _ in 0..3 {
        assert_eq!(run_job(&client, &testnet).await, late);
    }

    // Forged records sent straight to the facilitator's discovery port are dropped.
    let facilitator = testnet.node("facilitator").unwrap();
    let target: BootstrapPeer = format!("{}@{}", facilitator.hotkey, facilitator.p2p.unwrap())
        .parse()
        .unwrap();
    let rogue = SecretKey::generate();
    let victim = SecretKey::generate();
    let record_of = |key: &SecretKey| NodeRecord {
        hotkey: key.hotkey(),
        role: Role::Miner,
        addrs: vec![([127, 0, 0, 1], 9).into()],
        p2p_addrs: Vec::new(),
        capacity: vec![ClassCapacity {
            class: ExecutorClass("cpu".into()),
            free: 100,
            total: 100,
        }],
        version: "forged".into(),
        seq: u64::MAX - 1,
        expires_at: now().plus_millis(60_000),
        incarnation: horde_protocol::UnixMillis(1),
    };
    // PeerId mismatch: a genuine record of another key, presented as the rogue's own.
    let victims = Signed::sign(&victim, &record_of(&victim));
    // Bad signature: the late miner's hotkey with a record it never signed.
    let mut forged = Signed::sign(&rogue, &record_of(&SecretKey::generate()));
    let bytes = {
        let mut record = record_of(&rogue);
        record.hotkey = late;
        horde_protocol::codec::to_bytes(&record)
    };
    forged = Signed::from_parts(
        bytes,
        late,
        Signature::from_bytes(*forged.signature().as_bytes()),
    );
    for sync in [
        RecordSync {
            own: Some(victims),
            ..RecordSync::default()
        },
        RecordSync {
            relayed: vec![forged],
            ..RecordSync::default()
        },
    ] {
        exchange(&rogue, &target, sync, Duration::from_secs(5))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let known = testnet.known_by("facilitator").unwrap();
    assert!(!known.iter().any(|r| r.hotkey == victim.hotkey()));
    let late_record = known.iter().find(|r| r.hotkey == late).unwrap();
    assert_ne!(late_record.version, "forged");
    let log = testnet.log("facilitator");
    assert!(log.contains("sent as its own by peer"), "{log}");
    assert!(log.contains("bad signature"), "{log}");
    // And the network still works with the honest record.
    assert_eq!(run_job(&client, &testnet).await, late);
}

/// Seconds since midnight UTC of a log line's timestamp (`2026-12-05T11:08:21.123456Z …`).
fn time_of_day(line: &str) -> f64 {
    let time = line.split('T').nth(1).unwrap();
    let time = &time[..time.find('Z').unwrap()];
    let mut parts = time.split(':');
    let hours: f64 = parts.next().unwrap().parse().unwrap();
    let minutes: f64 = parts.next().unwrap().parse().unwrap();
    let seconds: f64 = parts.next().unwrap().parse().unwrap();
    hours * 3600.0 + minutes * 60.0 + seconds
}

#[test]
fn a_killed_facilitator_has_its_directory_back_within_a_second() {
    let mut testnet = Testnet::start(TestnetConfig {
        storage: 0,
        miners: 3,
        ..TestnetConfig::default()
    })
    .unwrap();
    let others: Vec<Hotkey> = testnet
        .nodes()
        .iter()
        .filter(|n| n.role != Role::Facilitator)
        .map(|n| n.hotkey)
        .collect();
    let port = testnet.node("facilitator").unwrap().p2p;
    // The kept directory is written within about a second of a node joining.
    std::thread::sleep(Duration::from_secs(3));
    // SIGKILL: no last write; it starts again on its port with what it kept.
    testnet.restart("facilitator").unwrap();
    assert_eq!(testnet.node("facilitator").unwrap().p2p, port);
    let known = testnet.known_by("facilitator").unwrap();
    assert!(others.iter().all(|h| known.iter().any(|r| r.hotkey == *h)));
    // From its own log: every other node was in its directory within a second of its start.
    let log = testnet.log("facilitator");
    let restart = log.rfind("horde node started").unwrap();
    let start_line = log[..restart].rsplit('\n').next().unwrap();
    let loaded = log
        .lines()
        .rev()
        .find(|l| l.contains("kept directory loaded"))
        .unwrap_or_else(|| panic!("no directory loaded:\n{log}"));
    assert!(
        loaded.contains(&format!("records={}", others.len())),
        "{loaded}"
    );
    let after_start = time_of_day(loaded) - time_of_day(start_line);
    assert!(
        after_start <= 1.0,
        "directory back {after_start} s after the start"
    );
}

/// Miners that join through the validators (each through one, in turn; the validators through
/// the facilitator) are known to the facilitator and every validator, and run jobs: the
/// facilitator need not be every node's bootstrap peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miners_joining_through_validators_are_known_and_used() {
    let testnet = Testnet::start(TestnetConfig {
        validators: 2,
        miners: 4,
        storage: 0,
        join_through_validators: true,
        ..TestnetConfig::default()
    })
    .unwrap();
    assert!(testnet.converged_in().is_some());
    let miners: Vec<Hotkey> = testnet
        .nodes()
        .iter()
        .filter(|n| n.role == Role::Miner)
        .map(|n| n.hotkey)
        .collect();
    for observer in ["facilitator", "validator-0", "validator-1"] {
        for miner in &miners {
            assert!(knows(&testnet, observer, miner), "{observer} lacks a miner");
        }
    }
    // Each miner was given one validator as its bootstrap peer, never the facilitator.
    let facilitator = testnet.node("facilitator").unwrap().hotkey.to_string();
    let validators: Vec<String> = ["validator-0", "validator-1"]
        .map(|name| testnet.node(name).unwrap().hotkey.to_string())
        .to_vec();
    for node in testnet.nodes().iter().filter(|n| n.role == Role::Miner) {
        let args = node.args();
        let bootstrap = args
            .iter()
            .skip_while(|a| *a != "--bootstrap")
            .nth(1)
            .unwrap();
        assert!(!bootstrap.starts_with(&facilitator), "{args:?}");
        assert!(
            validators.iter().any(|v| bootstrap.starts_with(v)),
            "{args:?}"
        );
    }
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let miner = run_job(&client, &testnet).await;
    assert!(miners.contains(&miner));
}
