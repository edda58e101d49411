//! Discovery between in-process nodes on loopback: records spread through a bootstrap peer,
//! capacity changes arrive, stopped nodes expire, forged records are dropped (over the record
//! exchange and on gossip, where their sender is penalised), a restarted node has its directory
//! back at once, its peers leave its old run and connect afresh (what it publishes reaches them),
//! a stopped node closes its connections at once (an aborted one does not), a node with peers of
//! its own leaves its bootstrap peer and rejoins it when cut off, and a bootstrap peer that all
//! its joiners left stays on gossip (it dials peers of its own), a peer that forwards a
//! node's own record back to it is not blamed for it, the facilitator, the validators and the
//! miners keep the backbone that carries capacity to the facilitator, and a joiner's first
//! announcement gets past its bootstrap peer even when its join fetch brought the record there
//! first.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use horde_node::client::now;
use horde_node::server::discovery::{
    BootstrapPeer, Directory, Discovery, DiscoveryConfig, LocalNode, capacity_gossip_topic,
    exchange, gossip_behaviour, gossip_encode, gossip_topic, peer_id, quic_multiaddr,
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
    start_with(key, role, capacity, config(bootstrap), cancel).await
}

async fn start_with(
    key: &SecretKey,
    role: Role,
    capacity: Option<watch::Receiver<Vec<ClassCapacity>>>,
    config: DiscoveryConfig,
    cancel: &CancellationToken,
) -> Discovery {
    let local = LocalNode {
        role,
        addrs: vec![([127, 0, 0, 1], 7000).into()],
        capacity,
        state_dir: None,
    };
    Discovery::start(key, local, &config, cancel.child_token())
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

/// Waits up to `limit` for `directory` to hold `miner`'s record with `expected` capacity.
async fn capacity_reaches(
    directory: &Directory,
    miner: &Hotkey,
    expected: &[ClassCapacity],
    limit: Duration,
    what: &str,
) {
    eventually(limit, what, || {
        directory
            .get(miner, now())
            .is_some_and(|r| r.capacity == expected)
    })
    .await;
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
    capacity_reaches(
        &fac_dir,
        &miner,
        &capacity(0),
        Duration::from_millis(1500),
        "capacity update arrives",
    )
    .await;
    capacity_reaches(
        &val_dir,
        &miner,
        &capacity(0),
        Duration::from_secs(3),
        "relayed update arrives",
    )
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
        incarnation: horde_protocol::UnixMillis(1),
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

/// A facilitator's discovery on its own, and how to reach it.
async fn lone_node() -> (CancellationToken, SecretKey, Discovery, BootstrapPeer) {
    let cancel = CancellationToken::new();
    let key = SecretKey::generate();
    let node = start(&key, Role::Facilitator, None, vec![], &cancel).await;
    let target = bootstrap_of(&node, &key);
    (cancel, key, node, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_are_dropped_and_honest_ones_kept() {
    let (cancel, node_key, node, target) = lone_node().await;
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

/// A rogue libp2p node speaking horde's gossip: it publishes whatever it is given.
async fn rogue_swarm(
    key: &SecretKey,
    target: &BootstrapPeer,
) -> libp2p::Swarm<libp2p::gossipsub::Behaviour> {
    rogue_swarm_with(key, target, gossip_behaviour().unwrap()).await
}

/// A rogue speaking gossipsub on horde's protocol and topic the way gossipsub does by default:
/// every message names its author (`from`, unsigned) and carries a sequence number.
async fn authored_rogue_swarm(
    key: &SecretKey,
    target: &BootstrapPeer,
) -> libp2p::Swarm<libp2p::gossipsub::Behaviour> {
    use libp2p::gossipsub::{ConfigBuilder, MessageAuthenticity, ValidationMode};
    let config = ConfigBuilder::default()
        .protocol_id_prefix(horde_protocol::wire::DISCOVERY_GOSSIP)
        .validation_mode(ValidationMode::Permissive)
        .build()
        .unwrap();
    let author = MessageAuthenticity::Author(peer_id(&key.hotkey()));
    let behaviour = libp2p::gossipsub::Behaviour::new(author, config).unwrap();
    rogue_swarm_with(key, target, behaviour).await
}

async fn rogue_swarm_with(
    key: &SecretKey,
    target: &BootstrapPeer,
    behaviour: libp2p::gossipsub::Behaviour,
) -> libp2p::Swarm<libp2p::gossipsub::Behaviour> {
    let mut seed = key.seed();
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(&mut seed[..]).unwrap();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| behaviour)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.behaviour_mut().subscribe(&gossip_topic()).unwrap();
    let dial = libp2p::swarm::dial_opts::DialOpts::peer_id(target.peer)
        .addresses(vec![target.addr.clone()])
        .build();
    swarm.dial(dial).unwrap();
    wait_subscribed(&mut swarm, target.peer, gossip_topic()).await;
    swarm
}

/// Runs the rogue until `peer` has told it that it is subscribed to `topic` (publishing before
/// that reaches nobody; a node's topics are announced one message each).
async fn wait_subscribed(
    swarm: &mut libp2p::Swarm<libp2p::gossipsub::Behaviour>,
    peer: libp2p::PeerId,
    topic: libp2p::gossipsub::IdentTopic,
) {
    use futures::StreamExt as _;
    let topic = topic.hash();
    let subscribed = async {
        while !swarm
            .behaviour()
            .all_peers()
            .any(|(id, topics)| *id == peer && topics.contains(&&topic))
        {
            swarm.select_next_some().await;
        }
    };
    // A bound for a loaded machine (a CI run once took more than 10 s here), not a measure.
    tokio::time::timeout(Duration::from_secs(30), subscribed)
        .await
        .expect("the node subscribed");
}

/// Publishes `data` from the rogue and keeps its swarm running for `for_`.
/// [`rogue_publish`] of one record as a gossip message.
async fn publish_record(
    swarm: &mut libp2p::Swarm<libp2p::gossipsub::Behaviour>,
    record: &Signed<NodeRecord>,
    for_: Duration,
) {
    rogue_publish(swarm, gossip_encode(record), for_).await;
}

async fn rogue_publish(
    swarm: &mut libp2p::Swarm<libp2p::gossipsub::Behaviour>,
    data: Vec<u8>,
    for_: Duration,
) {
    rogue_publish_on(swarm, gossip_topic(), data, for_).await;
}

async fn rogue_publish_on(
    swarm: &mut libp2p::Swarm<libp2p::gossipsub::Behaviour>,
    topic: libp2p::gossipsub::IdentTopic,
    data: Vec<u8>,
    for_: Duration,
) {
    use futures::StreamExt as _;
    swarm.behaviour_mut().publish(topic, data).unwrap();
    let _ = tokio::time::timeout(for_, async {
        loop {
            swarm.select_next_some().await;
        }
    })
    .await;
}

/// A lone facilitator ([`lone_node`]) and a rogue connected to it, with the rogue's key.
async fn rogue_at_lone_node() -> (
    CancellationToken,
    Discovery,
    BootstrapPeer,
    SecretKey,
    libp2p::Swarm<libp2p::gossipsub::Behaviour>,
) {
    let (cancel, _, node, target) = lone_node().await;
    let rogue = SecretKey::generate();
    let swarm = rogue_swarm(&rogue, &target).await;
    (cancel, node, target, rogue, swarm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_gossip_is_rejected_and_its_sender_penalised() {
    let (cancel, node, target, rogue, mut swarm) = rogue_at_lone_node().await;
    let directory = node.directory().clone();
    let rogue_peer = peer_id(&rogue.hotkey());

    // Control: the rogue's own genuine records are kept, and cost it nothing.
    let first = Signed::sign(&rogue, &record_of(rogue.hotkey(), 1));
    publish_record(&mut swarm, &first, Duration::from_millis(500)).await;
    let second = Signed::sign(&rogue, &record_of(rogue.hotkey(), 2));
    publish_record(&mut swarm, &second, Duration::from_millis(500)).await;
    assert_eq!(directory.get(&rogue.hotkey(), now()).unwrap().seq, 2);
    // A genuine record of another node, relayed: every node forwards every node's records, and
    // the record names and signs its node itself.
    let other = SecretKey::generate();
    let relayed = Signed::sign(&other, &record_of(other.hotkey(), 1));
    publish_record(&mut swarm, &relayed, Duration::from_millis(500)).await;
    assert!(directory.get(&other.hotkey(), now()).is_some());
    let score = node.peer_score(&rogue_peer).await.unwrap();
    assert!(score >= 0.0, "honest records penalised: {score}");

    // A replayed record: an older record of the rogue, with another expiry (new bytes, so not a
    // duplicate by id): dropped, without blame (honest peers forward late copies too).
    let mut older = record_of(rogue.hotkey(), 1);
    older.expires_at = now().plus_millis(90_000);
    let replayed = Signed::sign(&rogue, &older);
    publish_record(&mut swarm, &replayed, Duration::from_millis(300)).await;
    assert_eq!(directory.get(&rogue.hotkey(), now()).unwrap().seq, 2);
    // A record of a victim the rogue signed itself: the signer is not the hotkey it names (a
    // `seq` above the rogue's own, so it is not ignored as an old record of its signer first).
    let victim = SecretKey::generate();
    let misnamed = Signed::sign(&rogue, &record_of(victim.hotkey(), 5));
    publish_record(&mut swarm, &misnamed, Duration::from_millis(300)).await;
    // A forged record: the rogue's next record with a flipped signature bit.
    let good = Signed::sign(&rogue, &record_of(rogue.hotkey(), 3));
    let mut signature = *good.signature().as_bytes();
    signature[0] ^= 0x80;
    let forged = Signed::from_parts(
        good.bytes().to_vec(),
        rogue.hotkey(),
        Signature::from_bytes(signature),
    );
    publish_record(&mut swarm, &forged, Duration::from_millis(300)).await;
    // Garbage.
    rogue_publish(&mut swarm, vec![0xff; 40], Duration::from_millis(300)).await;

    assert!(directory.get(&victim.hotkey(), now()).is_none());
    assert_eq!(directory.get(&rogue.hotkey(), now()).unwrap().seq, 2);
    let score = node.peer_score(&rogue_peer).await.unwrap();
    // Three invalid records: -10 × 3², below the graylist threshold.
    assert!(score < -80.0, "rogue not penalised: {score}");

    // A message that names its author (gossipsub's default, unsigned: proves nothing) is
    // refused before it is read, even with a genuine record of its author in it, and its sender
    // is penalised.
    let authored = SecretKey::generate();
    let authored_peer = peer_id(&authored.hotkey());
    let mut swarm = authored_rogue_swarm(&authored, &target).await;
    let genuine = Signed::sign(&authored, &record_of(authored.hotkey(), 1));
    publish_record(&mut swarm, &genuine, Duration::from_millis(500)).await;
    assert!(directory.get(&authored.hotkey(), now()).is_none());
    let score = node.peer_score(&authored_peer).await.unwrap();
    assert!(score < 0.0, "authored message not penalised: {score}");
    cancel.cancel();
}

/// The capacity topic (the facilitator's and validators' own) is judged as the record topic is:
/// a genuine record published there is kept, a forged one dropped and its sender penalised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_on_the_capacity_topic_are_rejected_and_their_sender_penalised() {
    let (cancel, node, target, rogue, mut swarm) = rogue_at_lone_node().await;
    let directory = node.directory().clone();
    let rogue_peer = peer_id(&rogue.hotkey());
    wait_subscribed(&mut swarm, target.peer, capacity_gossip_topic()).await;
    let wait = Duration::from_millis(500);
    // The rogue's genuine record first, then three forgeries of its next ones.
    let mut records = vec![Signed::sign(&rogue, &record_of(rogue.hotkey(), 1))];
    for flip in 0..3u8 {
        let good = Signed::sign(&rogue, &record_of(rogue.hotkey(), 2 + u64::from(flip)));
        let mut signature = *good.signature().as_bytes();
        signature[usize::from(flip)] ^= 0x80;
        records.push(Signed::from_parts(
            good.bytes().to_vec(),
            rogue.hotkey(),
            Signature::from_bytes(signature),
        ));
    }
    for record in &records {
        let data = gossip_encode(record);
        rogue_publish_on(&mut swarm, capacity_gossip_topic(), data, wait).await;
        assert_eq!(directory.get(&rogue.hotkey(), now()).unwrap().seq, 1);
    }
    let score = node.peer_score(&rogue_peer).await.unwrap();
    assert!(score < -80.0, "rogue not penalised: {score}");
    cancel.cancel();
}

/// Runs the rogue until the node sends it a record message; its bytes.
async fn next_message(swarm: &mut libp2p::Swarm<libp2p::gossipsub::Behaviour>) -> Vec<u8> {
    use futures::StreamExt as _;
    let message = async {
        loop {
            if let libp2p::swarm::SwarmEvent::Behaviour(libp2p::gossipsub::Event::Message {
                message,
                ..
            }) = swarm.select_next_some().await
            {
                return message.data;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), message)
        .await
        .expect("the node published its record")
}

/// A node's own record coming back to it is what an honest peer does when its first copy came
/// by another path (in a busy network, often: the publisher's direct copy waits in a queue).
/// Gossipsub's default drops such a copy as a "self-origin" message and penalises its sender
/// as if it had sent an invalid record: at 256 nodes the facilitator scored its mesh peers
/// below zero and could not graft any for the rest of the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_echoes_a_nodes_own_record_back_is_not_penalised() {
    let (cancel, key, node, target) = lone_node().await;
    // The node publishes its record as soon as a first peer is subscribed.
    let first = SecretKey::generate();
    let mut first_swarm = rogue_swarm(&first, &target).await;
    let own = next_message(&mut first_swarm).await;
    let hotkey = key.hotkey();
    assert!(
        own.windows(32).any(|w| w == hotkey.as_bytes()),
        "not the node's record"
    );
    // A second peer, which got the record elsewhere, forwards it (the very bytes) to the node.
    let echo = SecretKey::generate();
    let echo_peer = peer_id(&echo.hotkey());
    let mut echo_swarm = rogue_swarm(&echo, &target).await;
    rogue_publish(&mut echo_swarm, own, Duration::from_millis(500)).await;
    let score = node.peer_score(&echo_peer).await.unwrap();
    assert!(
        score >= 0.0,
        "an honest echo of {hotkey} penalised: {score}"
    );
    cancel.cancel();
}

/// A facilitator's discovery keeping its directory in `state`, listening on `listen`.
async fn start_kept(
    key: &SecretKey,
    state: &std::path::Path,
    listen: std::net::SocketAddr,
    cancel: &CancellationToken,
) -> Result<Discovery, horde_node::server::discovery::DiscoveryError> {
    let config = DiscoveryConfig {
        listen,
        record_ttl: Duration::from_secs(60),
        ..DiscoveryConfig::default()
    };
    let local = LocalNode {
        role: Role::Facilitator,
        addrs: vec![([127, 0, 0, 1], 7000).into()],
        capacity: None,
        state_dir: Some(state.to_path_buf()),
    };
    Discovery::start(key, local, &config, cancel.child_token()).await
}

/// A facilitator's first run with a kept directory, on a free port: its state directory, key,
/// cancellation token (a child of `cancel`), discovery and bootstrap address.
async fn first_run_kept(
    cancel: &CancellationToken,
) -> (
    tempfile::TempDir,
    SecretKey,
    CancellationToken,
    Discovery,
    BootstrapPeer,
) {
    let state = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let run = cancel.child_token();
    let facilitator = start_kept(&key, state.path(), ([127, 0, 0, 1], 0).into(), &run)
        .await
        .unwrap();
    let boot = bootstrap_of(&facilitator, &key);
    (state, key, run, facilitator, boot)
}

/// Calls `start` until it binds `listen`: a restarted node's port is free again only once
/// libp2p's QUIC endpoint of the run before has let go of it (a moment after its swarm is
/// gone). Also returns when the successful attempt began. Panics after 10 s.
async fn start_when_free<F, Fut>(
    listen: std::net::SocketAddr,
    mut start: F,
) -> (Discovery, std::time::Instant)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<
            Output = Result<Discovery, horde_node::server::discovery::DiscoveryError>,
        >,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let began = std::time::Instant::now();
        match start().await {
            Ok(started) => return (started, began),
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("no start on {listen}: {error}"),
        }
    }
}

/// Starts [`start_kept`] again on `listen` once the port is free ([`start_when_free`]); also
/// returns when it started.
async fn restart_kept(
    key: &SecretKey,
    state: &std::path::Path,
    listen: std::net::SocketAddr,
    cancel: &CancellationToken,
) -> (Discovery, std::time::Instant) {
    start_when_free(listen, || start_kept(key, state, listen, cancel)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_has_its_directory_back_at_once() {
    let cancel = CancellationToken::new();
    let (state, fac_key, facilitator_cancel, facilitator, boot) = first_run_kept(&cancel).await;
    let listen = facilitator.listen_addrs()[0];
    let mut others = Vec::new();
    for role in [Role::Validator, Role::Miner, Role::Miner] {
        let key = SecretKey::generate();
        start(&key, role, None, vec![boot.clone()], &cancel).await;
        others.push(key.hotkey());
    }
    let directory = facilitator.directory().clone();
    eventually(Duration::from_secs(10), "facilitator knows all", || {
        others.iter().all(|h| directory.get(h, now()).is_some())
    })
    .await;
    // The facilitator stops (keeping its directory on disk) and starts again on its port.
    facilitator_cancel.cancel();
    facilitator.stopped().await;
    assert!(state.path().join("discovery-directory.bin").exists());

    let (facilitator, restarted_at) = restart_kept(&fac_key, state.path(), listen, &cancel).await;
    let directory = facilitator.directory().clone();
    eventually(Duration::from_secs(1), "the directory is back", || {
        others.iter().all(|h| directory.get(h, now()).is_some())
    })
    .await;
    assert!(restarted_at.elapsed() <= Duration::from_secs(1));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_a_restarted_node_leave_their_old_connection_at_once() {
    // A miner joins through a facilitator, which then stops without a word to it (aborted, as
    // by `kill -9`: the swarm's runtime is dropped, nothing is sent) and starts again on its
    // port.
    // The miner's old connection is dead, and QUIC would let it idle out only after 45 s; the
    // facilitator's new record (a later `incarnation`) must make the miner leave it at once (and
    // connect afresh), so that what the miner publishes next reaches the restarted facilitator.
    // The restart comes at once: a connection less than a second old is the old run's too.
    let cancel = CancellationToken::new();
    let (state, fac_key, _first_run, facilitator, boot) = first_run_kept(&cancel).await;
    let listen = facilitator.listen_addrs()[0];
    let miner_key = SecretKey::generate();
    let (capacity_tx, capacity_rx) = watch::channel(capacity(2));
    let miner = start(
        &miner_key,
        Role::Miner,
        Some(capacity_rx),
        vec![boot],
        &cancel,
    )
    .await;
    let (fac_dir, miner_dir) = (facilitator.directory().clone(), miner.directory().clone());
    eventually(Duration::from_secs(10), "both know each other", || {
        fac_dir.get(&miner_key.hotkey(), now()).is_some()
            && miner_dir.get(&fac_key.hotkey(), now()).is_some()
    })
    .await;
    let old = miner_dir.get(&fac_key.hotkey(), now()).unwrap();
    facilitator.abort().await;

    let (facilitator, restarted_at) = restart_kept(&fac_key, state.path(), listen, &cancel).await;
    let fac_dir = facilitator.directory().clone();
    // The restarted facilitator dials the miner from its kept directory and sends its record.
    eventually(
        Duration::from_secs(2),
        "the miner has the new run's record",
        || {
            miner_dir
                .get(&fac_key.hotkey(), now())
                .is_some_and(|r| r.seq > old.seq && r.incarnation > old.incarnation)
        },
    )
    .await;
    // The miner's next record reaches the facilitator on a live connection: before the
    // facilitator's first pull (3 s after it connected), long before the old connection's idle
    // timeout.
    tokio::time::sleep(Duration::from_millis(200)).await;
    capacity_tx.send(capacity(0)).unwrap();
    capacity_reaches(
        &fac_dir,
        &miner_key.hotkey(),
        &capacity(0),
        Duration::from_millis(1500),
        "the capacity change reaches the restarted facilitator",
    )
    .await;
    assert!(
        restarted_at.elapsed() < Duration::from_secs(3),
        "{:?}",
        restarted_at.elapsed()
    );
    cancel.cancel();
}

/// A miner's discovery keeping its directory in `state`, joining through `bootstrap`; started
/// again on `listen` (port 0 the first time) once the port is free ([`start_when_free`]).
async fn start_miner_kept(
    key: &SecretKey,
    capacity: watch::Receiver<Vec<ClassCapacity>>,
    bootstrap: &BootstrapPeer,
    state: &std::path::Path,
    listen: std::net::SocketAddr,
    cancel: &CancellationToken,
) -> Discovery {
    let config = DiscoveryConfig {
        listen,
        ..config(vec![bootstrap.clone()])
    };
    let start = || {
        let local = LocalNode {
            role: Role::Miner,
            addrs: vec![([127, 0, 0, 1], 7000).into()],
            capacity: Some(capacity.clone()),
            state_dir: Some(state.to_path_buf()),
        };
        Discovery::start(key, local, &config, cancel.child_token())
    };
    start_when_free(listen, start).await.0
}

/// A node killed and started again while its peers still hold connections to its old run: its
/// peers connect to the new run afresh, and what it publishes on gossip reaches them. gossipsub
/// tells a peer its topics only on the first connection to it; a peer that kept a connection to
/// the old run never told the new run, which then saw nobody on the topic and published nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_publishes_to_peers_that_held_its_old_run() {
    let cancel = CancellationToken::new();
    let fac_key = SecretKey::generate();
    let facilitator = start(&fac_key, Role::Facilitator, None, vec![], &cancel).await;
    let boot = bootstrap_of(&facilitator, &fac_key);
    let val_key = SecretKey::generate();
    let validator = start(&val_key, Role::Validator, None, vec![boot.clone()], &cancel).await;
    let state = tempfile::tempdir().unwrap();
    let miner_key = SecretKey::generate();
    let miner_peer = peer_id(&miner_key.hotkey());
    let (capacity_tx, capacity_rx) = watch::channel(capacity(2));
    let first_run = start_miner_kept(
        &miner_key,
        capacity_rx.clone(),
        &boot,
        state.path(),
        ([127, 0, 0, 1], 0).into(),
        &cancel,
    )
    .await;
    let listen = first_run.listen_addrs()[0];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(facilitator.is_connected(&miner_peer).await
        && validator.is_connected(&miner_peer).await
        && first_run.directory().len() == 2
        && state.path().join("discovery-directory.bin").exists())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: the miner is not connected to both"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old = facilitator
        .directory()
        .get(&miner_key.hotkey(), now())
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    first_run.abort().await;

    let _miner = start_miner_kept(
        &miner_key,
        capacity_rx,
        &boot,
        state.path(),
        listen,
        &cancel,
    )
    .await;
    let (fac_dir, val_dir) = (
        facilitator.directory().clone(),
        validator.directory().clone(),
    );
    eventually(
        Duration::from_secs(5),
        "both have the new run's record",
        || {
            [&fac_dir, &val_dir].iter().all(|directory| {
                directory
                    .get(&miner_key.hotkey(), now())
                    .is_some_and(|r| r.incarnation > old.incarnation)
            })
        },
    )
    .await;
    // A capacity change travels on gossip (or in a pull, which asks a peer on the topic too);
    // the record exchanges of the restart went out before it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    capacity_tx.send(capacity(0)).unwrap();
    eventually(
        Duration::from_secs(10),
        "the restarted miner's capacity change reaches both on gossip",
        || {
            [&fac_dir, &val_dir].iter().all(|directory| {
                directory
                    .get(&miner_key.hotkey(), now())
                    .is_some_and(|r| r.capacity == capacity(0))
            })
        },
    )
    .await;
    cancel.cancel();
}

/// A node that stops closes its connections: its peers see them closed at once, not at their
/// QUIC idle timeout (45 s), and stop sending into them. One that is aborted (as by `kill -9`)
/// sends nothing: its peers still hold its connection seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_closes_its_connections_at_once_and_an_aborted_one_does_not() {
    let cancel = CancellationToken::new();
    let boot_key = SecretKey::generate();
    let boot = start(&boot_key, Role::Facilitator, None, vec![], &cancel).await;
    let bootstrap = bootstrap_of(&boot, &boot_key);
    let (stopped_key, aborted_key) = (SecretKey::generate(), SecretKey::generate());
    let stopping = cancel.child_token();
    let stopped = start(
        &stopped_key,
        Role::Miner,
        None,
        vec![bootstrap.clone()],
        &stopping,
    )
    .await;
    let aborted = start(&aborted_key, Role::Miner, None, vec![bootstrap], &cancel).await;
    let stopped_peer = peer_id(&stopped_key.hotkey());
    let aborted_peer = peer_id(&aborted_key.hotkey());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(boot.is_connected(&stopped_peer).await && boot.is_connected(&aborted_peer).await) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: the miners are not connected to the facilitator"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    stopping.cancel();
    stopped.stopped().await;
    let closed_at = std::time::Instant::now();
    while boot.is_connected(&stopped_peer).await {
        assert!(
            closed_at.elapsed() < Duration::from_secs(1),
            "the stopped miner's connection is still open at the facilitator"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    aborted.abort().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        boot.is_connected(&aborted_peer).await,
        "the aborted miner's connection was closed: an abort must send nothing"
    );
    cancel.cancel();
}

/// A node whose network gives it peers of its own closes the connection it dialed to its
/// bootstrap peer (so the bootstrap peer's connections do not grow with the network); once it
/// has lost those peers it dials the bootstrap peer again, and records reach it through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaves_its_bootstrap_peer_and_rejoins_it_when_cut_off() {
    let cancel = CancellationToken::new();
    let boot_key = SecretKey::generate();
    let boot = start(&boot_key, Role::Facilitator, None, vec![], &cancel).await;
    let bootstrap = bootstrap_of(&boot, &boot_key);
    let boot_peer = peer_id(&boot_key.hotkey());
    let mut nodes = Vec::new();
    for _ in 0..6 {
        let own = cancel.child_token();
        let key = SecretKey::generate();
        let node = start(&key, Role::Miner, None, vec![bootstrap.clone()], &own).await;
        nodes.push((own, node));
    }
    // Every node joins; each leaves its bootstrap connection once it has its own peers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let left = loop {
        let mut found = None;
        for (i, (_, node)) in nodes.iter().enumerate() {
            if node.directory().len() == 6 && node.bootstrap_connections().await == 0 {
                found = Some(i);
                break;
            }
        }
        if let Some(i) = found {
            break i;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: no node left its bootstrap peer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (keep_cancel, kept) = nodes.swap_remove(left);
    // Every other node stops: the one that left is cut off and is connected to its bootstrap
    // peer again (it dials it, unless the bootstrap peer, which lost its peers too, dialed it
    // first for its own mesh).
    for (own, node) in nodes {
        own.cancel();
        node.stopped().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !kept.is_connected(&boot_peer).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: the cut-off node is not connected to its bootstrap peer again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Records reach it through the bootstrap peer again: a node joining now is learned.
    let late_key = SecretKey::generate();
    let _late = start(&late_key, Role::Miner, None, vec![bootstrap], &cancel).await;
    eventually(Duration::from_secs(30), "the late node is learned", || {
        kept.directory().get(&late_key.hotkey(), now()).is_some()
    })
    .await;
    keep_cancel.cancel();
    cancel.cancel();
}

/// Whether every node has closed the connections it dialed to its bootstrap peer.
async fn all_left(nodes: &[(SecretKey, watch::Sender<Vec<ClassCapacity>>, Discovery)]) -> bool {
    for (_, _, node) in nodes {
        if node.bootstrap_connections().await > 0 {
            return false;
        }
    }
    true
}

/// A config with records of the default lifetime (2 minutes): no refresh within a test, so only
/// what the nodes do on their own moves records.
fn long(bootstrap: Vec<BootstrapPeer>) -> DiscoveryConfig {
    DiscoveryConfig {
        bootstrap,
        ..DiscoveryConfig::default()
    }
}

/// A facilitator with records of the default lifetime, and the peer to bootstrap through it.
async fn long_facilitator(cancel: &CancellationToken) -> (Discovery, BootstrapPeer) {
    let key = SecretKey::generate();
    let facilitator = start_with(&key, Role::Facilitator, None, long(vec![]), cancel).await;
    let bootstrap = bootstrap_of(&facilitator, &key);
    (facilitator, bootstrap)
}

/// `count` miners with long-lived records joining through `bootstrap`, each with the sender of
/// its capacity (2 free).
async fn start_miners(
    count: usize,
    bootstrap: &BootstrapPeer,
    cancel: &CancellationToken,
) -> Vec<(SecretKey, watch::Sender<Vec<ClassCapacity>>, Discovery)> {
    let mut nodes = Vec::new();
    for _ in 0..count {
        let key = SecretKey::generate();
        let (capacity_tx, capacity_rx) = watch::channel(capacity(2));
        let node = start_with(
            &key,
            Role::Miner,
            Some(capacity_rx),
            long(vec![bootstrap.clone()]),
            cancel,
        )
        .await;
        nodes.push((key, capacity_tx, node));
    }
    nodes
}

/// Waits up to 60 s for every node to close the connections it dialed to its bootstrap peer.
async fn wait_all_left(nodes: &[(SecretKey, watch::Sender<Vec<ClassCapacity>>, Discovery)]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !all_left(nodes).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: not every node left its bootstrap peer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_peer_stays_on_gossip_after_every_joiner_left_it() {
    let cancel = CancellationToken::new();
    // Records of the default lifetime (2 minutes): no refresh within the test, so only what
    // the nodes do on their own, not a refresh arriving, can bring the bootstrap peer new peers.
    let (boot, bootstrap) = long_facilitator(&cancel).await;
    let nodes = start_miners(6, &bootstrap, &cancel).await;
    // Every node joins through the bootstrap peer (connected to it while the bootstrap peer
    // learns it) and leaves it once it has peers of its own.
    wait_all_left(&nodes).await;
    // A capacity change reaches it by gossip: it has peers of its own (it dialed them once
    // its joiners had left), not none until its record expired and they came back to it.
    let fac_dir = boot.directory().clone();
    let (key, capacity_tx, _) = &nodes[0];
    capacity_tx.send(capacity(0)).unwrap();
    capacity_reaches(
        &fac_dir,
        &key.hotkey(),
        &capacity(0),
        Duration::from_secs(5),
        "the capacity change reaches the bootstrap peer",
    )
    .await;
    cancel.cancel();
}

/// The capacity backbone: the facilitator and the validators keep connections to each other
/// (a validator whose bootstrap peer is a miner dials the facilitator once it learns it), every
/// miner keeps one to a validator, and a miner's capacity change reaches the facilitator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validators_and_miners_keep_the_facilitators_backbone() {
    let cancel = CancellationToken::new();
    let (fac, bootstrap) = long_facilitator(&cancel).await;
    let miners = start_miners(10, &bootstrap, &cancel).await;
    let through_fac = SecretKey::generate();
    let through_miner = SecretKey::generate();
    let miner_bootstrap = bootstrap_of(&miners[0].2, &miners[0].0);
    let validators = [
        start_with(
            &through_fac,
            Role::Validator,
            None,
            long(vec![bootstrap.clone()]),
            &cancel,
        )
        .await,
        start_with(
            &through_miner,
            Role::Validator,
            None,
            long(vec![miner_bootstrap]),
            &cancel,
        )
        .await,
    ];
    let validator_peers = [
        peer_id(&through_fac.hotkey()),
        peer_id(&through_miner.hotkey()),
    ];
    // Every miner joins and leaves its bootstrap connection (to the facilitator).
    wait_all_left(&miners).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut missing = Vec::new();
        for (i, peer) in validator_peers.iter().enumerate() {
            if !fac.is_connected(peer).await {
                missing.push(format!("validator {i} - facilitator"));
            }
        }
        for (i, (_, _, miner)) in miners.iter().enumerate() {
            let mut any = false;
            for peer in &validator_peers {
                any |= miner.is_connected(peer).await;
            }
            if !any {
                missing.push(format!("miner {i} - a validator"));
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: backbone links missing: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still there a few heartbeats later (not a join's connection about to be left).
    tokio::time::sleep(Duration::from_secs(6)).await;
    for peer in &validator_peers {
        assert!(
            fac.is_connected(peer).await,
            "a validator left the facilitator"
        );
    }
    let fac_dir = fac.directory().clone();
    for (key, capacity_tx, _) in &miners[..3] {
        capacity_tx.send(capacity(1)).unwrap();
        capacity_reaches(
            &fac_dir,
            &key.hotkey(),
            &capacity(1),
            Duration::from_secs(5),
            "a capacity change reaches the facilitator",
        )
        .await;
        for validator in &validators {
            capacity_reaches(
                validator.directory(),
                &key.hotkey(),
                &capacity(1),
                Duration::from_secs(5),
                "a capacity change reaches every validator",
            )
            .await;
        }
    }
    // The other miners were not woken by it (it went on the capacity topic, which they do not
    // follow): they still hold the changed miners' records as they were (refreshed only after
    // a lifetime here).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (_, _, miner) in &miners[3..] {
        for (key, _, _) in &miners[..3] {
            let held = miner.directory().get(&key.hotkey(), now()).unwrap();
            assert_eq!(
                held.capacity,
                capacity(2),
                "a capacity change reached a miner"
            );
        }
    }
    drop(validators);
    cancel.cancel();
}

/// A miner whose relay validator stops chooses another validator and connects to it, not the
/// stopped one again: the stopped validator's record lives on in every directory (2 minutes
/// here), so a choice at random among live records would pick it again half the time and wait
/// out a failed dial and a longer back-off before the next try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miner_whose_relay_stops_chooses_another_validator() {
    let cancel = CancellationToken::new();
    let (_facilitator, bootstrap) = long_facilitator(&cancel).await;
    let keys = [SecretKey::generate(), SecretKey::generate()];
    let stops = [cancel.child_token(), cancel.child_token()];
    let mut validators = Vec::new();
    for (key, stop) in keys.iter().zip(&stops) {
        let config = long(vec![bootstrap.clone()]);
        validators.push(start_with(key, Role::Validator, None, config, stop).await);
    }
    let validator_peers = keys.each_ref().map(|key| peer_id(&key.hotkey()));
    let miners = start_miners(8, &bootstrap, &cancel).await;
    // Every miner has a relay among the two validators and is connected to it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let relays = loop {
        let mut relays = Vec::new();
        for (_, _, miner) in &miners {
            match miner.relay().await {
                Some(relay) if miner.is_connected(&relay).await => relays.push(relay),
                _ => break,
            }
        }
        if relays.len() == miners.len() {
            break relays;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {} of {} miners connected to a relay",
            relays.len(),
            miners.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(relays.iter().all(|relay| validator_peers.contains(relay)));
    // Stop the validator relaying for more miners (at least 4 of 8).
    let on_first = relays.iter().filter(|r| **r == validator_peers[0]).count();
    let (stopped, other) = if on_first * 2 >= miners.len() {
        (0, 1)
    } else {
        (1, 0)
    };
    stops[stopped].cancel();
    let orphans: Vec<_> = miners
        .iter()
        .zip(&relays)
        .filter(|(_, relay)| **relay == validator_peers[stopped])
        .map(|((_, _, miner), _)| miner)
        .collect();
    // The back-off after a lost relay is 2-2.5 s; a second try after a failed dial of the
    // stopped validator would come 4-5 s after that.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    loop {
        let mut moved = 0;
        for miner in &orphans {
            if miner.relay().await == Some(validator_peers[other])
                && miner.is_connected(&validator_peers[other]).await
            {
                moved += 1;
            }
        }
        if moved == orphans.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {moved} of {} miners of the stopped validator moved to the other",
            orphans.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
}

/// A joiner sends its record to its bootstrap peer twice at once: in its join fetch and on
/// gossip. When the fetch arrives first (the common order on a busy bootstrap peer: at 256
/// nodes the facilitator ignored all 255 first announcements), the bootstrap peer keeps the
/// record from it and must still forward the gossip copy, the joiner's first announcement, or
/// the announcement ends there (the joiner's only peer) and the rest of the network learns the
/// joiner only from its second announcement, 2 s after its join fetch is answered (at 256
/// nodes, 12 s after the last joiners started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiners_first_announcement_spreads_beyond_its_bootstrap_peer() {
    use futures::StreamExt as _;
    let (cancel, _, boot, target) = lone_node().await;
    // A peer of the bootstrap node that only listens, on its mesh after a few heartbeats.
    let observer = SecretKey::generate();
    let mut observer_swarm = rogue_swarm(&observer, &target).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            observer_swarm.select_next_some().await;
        }
    })
    .await;
    // The joiner: its record in a record exchange (as its join fetch carries it), then the
    // same record on gossip.
    let joiner = SecretKey::generate();
    let record = Signed::sign(&joiner, &record_of(joiner.hotkey(), 1));
    send(&joiner, &target, Some(record.clone()), Vec::new()).await;
    assert!(boot.directory().get(&joiner.hotkey(), now()).is_some());
    let mut joiner_swarm = rogue_swarm(&joiner, &target).await;
    joiner_swarm
        .behaviour_mut()
        .publish(gossip_topic(), gossip_encode(&record))
        .unwrap();
    let arrived = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            tokio::select! {
                event = observer_swarm.select_next_some() => {
                    if let libp2p::swarm::SwarmEvent::Behaviour(
                        libp2p::gossipsub::Event::Message { message, .. },
                    ) = event
                        && message.data == gossip_encode(&record)
                    {
                        return;
                    }
                }
                _ = joiner_swarm.select_next_some() => {}
            }
        }
    })
    .await;
    assert!(
        arrived.is_ok(),
        "the joiner's first announcement did not get past its bootstrap peer"
    );
    cancel.cancel();
}
