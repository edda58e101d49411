//! Discovery between in-process nodes on loopback: records spread through a bootstrap peer,
//! capacity changes arrive, stopped nodes expire, forged records are dropped.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use horde_node::client::now;
use horde_node::server::discovery::{
    BootstrapPeer, Discovery, DiscoveryConfig, LocalNode, exchange, peer_id, quic_multiaddr,
};
use horde_protocol::{
    ClassCapacity, ExecutorClass, Hotkey, NodeRecord, RecordSync, Role, SecretKey, Signature,
    Signed,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(2);

fn config(bootstrap: Vec<BootstrapPeer>) -> DiscoveryConfig {
    DiscoveryConfig {
        bootstrap,
        record_ttl: TTL,
        ..DiscoveryConfig::default()
    }
}

fn bootstrap_of(discovery: &Discovery, key: &SecretKey) -> BootstrapPeer {
    BootstrapPeer {
        peer: peer_id(&key.hotkey()),
        addr: quic_multiaddr(discovery.listen_addrs()[0]),
    }
}

async fn start(
    key: &SecretKey,
    role: Role,
    capacity: Option<watch::Receiver<Vec<ClassCapacity>>>,
    bootstrap: Vec<BootstrapPeer>,
    cancel: &CancellationToken,
) -> Discovery {
    let local = LocalNode {
        role,
        addrs: vec![([127, 0, 0, 1], 7000).into()],
        capacity,
    };
    Discovery::start(key, local, &config(bootstrap), cancel.child_token())
        .await
        .unwrap()
}

/// Polls `check` every 20 ms for up to `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn capacity(free: u32) -> Vec<ClassCapacity> {
    vec![ClassCapacity {
        class: ExecutorClass("cpu".into()),
        free,
        total: 2,
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_spread_update_and_expire() {
    let cancel = CancellationToken::new();
    let (fac_key, miner_key, val_key) = (
        SecretKey::generate(),
        SecretKey::generate(),
        SecretKey::generate(),
    );
    let facilitator = start(&fac_key, Role::Facilitator, None, vec![], &cancel).await;
    let boot = bootstrap_of(&facilitator, &fac_key);
    let (capacity_tx, capacity_rx) = watch::channel(capacity(2));
    let miner_cancel = cancel.child_token();
    let _miner = start(
        &miner_key,
        Role::Miner,
        Some(capacity_rx),
        vec![boot.clone()],
        &miner_cancel,
    )
    .await;
    let validator = start(&val_key, Role::Validator, None, vec![boot], &cancel).await;

    let fac_dir = facilitator.directory().clone();
    let val_dir = validator.directory().clone();
    let miner = miner_key.hotkey();
    eventually(Duration::from_secs(5), "facilitator knows both", || {
        fac_dir.get(&miner, now()).is_some() && fac_dir.get(&val_key.hotkey(), now()).is_some()
    })
    .await;
    // The validator joined through the facilitator and learns the miner from it.
    eventually(Duration::from_secs(5), "validator knows the miner", || {
        val_dir.get(&miner, now()).is_some()
    })
    .await;
    let record = fac_dir.get(&miner, now()).unwrap();
    assert_eq!(record.role, Role::Miner);
    assert_eq!(record.capacity, capacity(2));
    assert_eq!(record.addrs, vec![([127, 0, 0, 1], 7000).into()]);

    // A capacity change is published at once (well before the periodic re-sign).
    capacity_tx.send(capacity(0)).unwrap();
    eventually(
        Duration::from_millis(1500),
        "capacity update arrives",
        || {
            fac_dir
                .get(&miner, now())
                .is_some_and(|r| r.capacity == capacity(0))
        },
    )
    .await;
    eventually(Duration::from_secs(3), "relayed update arrives", || {
        val_dir
            .get(&miner, now())
            .is_some_and(|r| r.capacity == capacity(0))
    })
    .await;

    // Records are re-signed before they expire: still known after two lifetimes.
    tokio::time::sleep(TTL * 2).await;
    assert!(fac_dir.get(&miner, now()).is_some());
    assert!(val_dir.get(&miner, now()).is_some());

    // The miner leaves: after its record's lifetime nobody lists it.
    miner_cancel.cancel();
    eventually(TTL + Duration::from_secs(3), "the record expires", || {
        fac_dir.get(&miner, now()).is_none() && val_dir.get(&miner, now()).is_none()
    })
    .await;
    assert_eq!(fac_dir.count(Role::Miner, now()), 0);
    assert!(fac_dir.get(&val_key.hotkey(), now()).is_some());
    cancel.cancel();
}

fn record_of(named: Hotkey, seq: u64) -> NodeRecord {
    NodeRecord {
        hotkey: named,
        role: Role::Miner,
        addrs: vec![([127, 0, 0, 1], 7001).into()],
        p2p_addrs: Vec::new(),
        capacity: capacity(1),
        version: "test".into(),
        seq,
        expires_at: now().plus_millis(60_000),
    }
}

async fn send(
    from: &SecretKey,
    to: &BootstrapPeer,
    own: Option<Signed<NodeRecord>>,
    relayed: Vec<Signed<NodeRecord>>,
) -> RecordSync {
    exchange(
        from,
        to,
        RecordSync {
            own,
            relayed,
            want_all: false,
        },
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_are_dropped_and_honest_ones_kept() {
    let cancel = CancellationToken::new();
    let node_key = SecretKey::generate();
    let node = start(&node_key, Role::Facilitator, None, vec![], &cancel).await;
    let target = bootstrap_of(&node, &node_key);
    let directory = node.directory().clone();

    let rogue = SecretKey::generate();
    let victim = SecretKey::generate();
    // 1. PeerId mismatch: the rogue presents the victim's genuine record as its own.
    let victims_record = Signed::sign(&victim, &record_of(victim.hotkey(), 1));
    let answer = send(&rogue, &target, Some(victims_record), vec![]).await;
    // The node answers with its own record whatever it thinks of ours.
    assert_eq!(
        answer.own.unwrap().verify().unwrap().hotkey,
        node_key.hotkey()
    );
    // 2. Signature by one key naming another (relayed).
    let other = SecretKey::generate();
    let misnamed = Signed::sign(&rogue, &record_of(other.hotkey(), 1));
    // 3. A tampered signature (relayed).
    let third = SecretKey::generate();
    let good = Signed::sign(&third, &record_of(third.hotkey(), 1));
    let mut signature = *good.signature().as_bytes();
    signature[0] ^= 0x80;
    let tampered = Signed::from_parts(
        good.bytes().to_vec(),
        third.hotkey(),
        Signature::from_bytes(signature),
    );
    send(&rogue, &target, None, vec![misnamed, tampered]).await;
    // Honest control: the rogue's own record, and a genuine relayed record of a fourth node.
    let fourth = SecretKey::generate();
    let relayed = Signed::sign(&fourth, &record_of(fourth.hotkey(), 1));
    let rogue_own = Signed::sign(&rogue, &record_of(rogue.hotkey(), 1));
    send(&rogue, &target, Some(rogue_own), vec![relayed]).await;

    eventually(Duration::from_secs(2), "honest records kept", || {
        directory.get(&fourth.hotkey(), now()).is_some()
            && directory.get(&rogue.hotkey(), now()).is_some()
    })
    .await;
    for (name, key) in [
        ("victim", &victim),
        ("misnamed", &other),
        ("tampered", &third),
    ] {
        assert!(
            directory.get(&key.hotkey(), now()).is_none(),
            "{name} record kept"
        );
    }
    // The same, as another node sees it through the exchange.
    let listing = exchange(
        &SecretKey::generate(),
        &target,
        RecordSync {
            own: None,
            relayed: Vec::new(),
            want_all: true,
        },
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let listed: Vec<Hotkey> = listing
        .relayed
        .iter()
        .map(|r| r.verify().unwrap().hotkey)
        .collect();
    assert!(listed.contains(&fourth.hotkey()));
    assert!(listed.contains(&rogue.hotkey()));
    assert!(!listed.contains(&victim.hotkey()));
    assert!(!listed.contains(&third.hotkey()));
    // An older seq never replaces a newer one.
    let older = Signed::sign(&fourth, &record_of(fourth.hotkey(), 0));
    send(&rogue, &target, None, vec![older]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(directory.get(&fourth.hotkey(), now()).unwrap().seq, 1);
    cancel.cancel();
}
