//! Record dissemination on gossipsub: the topic, the router's settings (mesh, flood protection,
//! peer scoring; each with its reason) and the check every record message passes before it is
//! kept or forwarded ([`judge`]).
//!
//! Messages carry one postcard-encoded `Signed<NodeRecord>`; the message id is the BLAKE3 hash of
//! those bytes, so two different records never share an id (an id built from `(hotkey, seq)`
//! would let a forged record with a victim's next `seq` suppress the real one as a "duplicate").
//! Validation is manual: gossipsub forwards a message only after [`judge`] said
//! [`Verdict::Accept`]; [`Verdict::Reject`] also lowers the sender's score (P₄), and
//! [`Verdict::Ignore`] drops a message honest peers may forward too (a stale or expired copy).
//!
//! Messages are anonymous (gossipsub's `ValidationMode::Anonymous`): no `from`, no `seqno`, no
//! gossipsub signature. A record names and signs its own node (signer = hotkey, and the hotkey
//! is the `PeerId`); a `from` field would be unsigned, so any publisher could write any `PeerId`
//! into it, and comparing it with the record proved nothing. Without the two fields a record
//! message is ~50 bytes (a fifth) smaller on every copy: at 256 nodes, loopback bytes per node
//! over a 90 s window holding the refresh wave fell from 2.6 to 1.9 KB/s (D = 3 in both;
//! `discovery-scale`, 2026-12-06 08:51 / 08:59 UTC, one run each). A message that carries either field is rejected by gossipsub and
//! its sender penalised like a bad record.

use std::time::Duration;

use horde_protocol::codec::{from_bytes_exact, from_bytes_prefix, to_bytes};
use horde_protocol::{NodeRecord, Signed, UnixMillis};
use libp2p::gossipsub::{
    self, IdentTopic, MessageAuthenticity, MessageId, PeerScoreParams, PeerScoreThresholds,
    TopicScoreParams, ValidationMode,
};

use super::directory::{Directory, RecordRejection, check_record};

/// Largest record message accepted or published (a record at every limit of [`check_record`]
/// is far smaller; anything bigger is refused before it is decoded).
pub const MAX_RECORD_BYTES: usize = 8 * 1024;

/// Largest gossipsub frame: a few records plus control messages (IHAVE lists of up to
/// [`MAX_IHAVE_LENGTH`] ids of 32 bytes).
const MAX_TRANSMIT_SIZE: usize = 64 * 1024;
/// Per-peer gossipsub send queue (half of it for forwarded records).
const QUEUE_LEN: usize = 256;
/// Most message ids one IHAVE may list: a whole 256-node network's records several times over.
const MAX_IHAVE_LENGTH: usize = 1024;
/// Messages this size and larger are announced with IDONTWANT to mesh peers (records never are).
const IDONTWANT_MIN: usize = 1024;
/// How long a peer pruned from a mesh stays out of it (see `behaviour`). Above gossipsub's
/// `graft_flood_threshold` (10 s), so a GRAFT at the end of the backoff is never scored as a flood.
const PRUNE_BACKOFF: Duration = Duration::from_secs(15);

/// The topic every node subscribes to.
pub fn topic() -> IdentTopic {
    IdentTopic::new(horde_protocol::wire::DISCOVERY_GOSSIP_TOPIC)
}

/// The topic of capacity changes (the same record messages): a miner publishes its record
/// re-signed for a change of its free executors here, and only the nodes that act on capacity
/// subscribe to it. At 256 nodes a change flooded on [`topic`] woke all 256 processes (each
/// judged and forwarded it) while only the facilitator and 16 validators use it; eight jobs
/// starting at once made eight such floods, and on 2 cores the facilitator's copy waited behind
/// them (p99 157–301 ms, signed → kept by the facilitator). Other nodes get the new capacity
/// with the miner's next refresh on [`topic`].
pub fn capacity_topic() -> IdentTopic {
    IdentTopic::new(horde_protocol::wire::DISCOVERY_CAPACITY_TOPIC)
}

/// Whether a node of `role` subscribes to [`capacity_topic`]: the roles that act on capacity.
pub(super) fn follows_capacity(role: horde_protocol::Role) -> bool {
    matches!(
        role,
        horde_protocol::Role::Facilitator | horde_protocol::Role::Validator
    )
}

/// The message id of a record message: BLAKE3 of its bytes.
pub fn message_id(data: &[u8]) -> MessageId {
    MessageId::new(blake3::hash(data).as_bytes())
}

/// A record as a gossip message.
pub fn encode(signed: &Signed<NodeRecord>) -> Vec<u8> {
    to_bytes(signed)
}

/// The byte that follows the record in its node's second announcement ([`encode_again`]).
const AGAIN: u8 = 1;

/// The node's second announcement of the record it announced already (see `SETTLE_DELAY` in
/// `task.rs`): the same signed bytes and a trailing [`AGAIN`], so the message has an id of its
/// own (a copy of the first would be dropped as a duplicate everywhere) while the record needs
/// no new signature. A node that holds the very record forwards it without checking anything
/// but the bytes (nodes that missed the first copy sit behind it); one that lacks it checks it
/// in full. Re-signing instead cost the network a signature check per node per node (~31,000
/// of the ~96,000 checks of a 256-node start, `discovery-scale`, 2026-12-06 14:44 UTC).
///
/// A replay gains an attacker nothing: the message id is remembered as long as the record
/// lives (`duplicate_cache_time`), so each node forwards it at most once, and only while it
/// holds that very record.
pub(super) fn encode_again(signed: &Signed<NodeRecord>) -> Vec<u8> {
    let mut data = to_bytes(signed);
    data.push(AGAIN);
    data
}

/// What becomes of a record message.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Kept (newer than the one held) and forwarded.
    Accept(Box<(Signed<NodeRecord>, NodeRecord)>),
    /// A second announcement of the very record held: forwarded, nothing to keep.
    Forward,
    /// Dropped without blame: not newer than the record held, expired, or our own.
    Ignore(&'static str),
    /// Dropped and its sender penalised: it cannot have come from an honest peer.
    Reject(RecordRejection),
}

/// Checks a record message from gossip against the directory (without changing it).
///
/// Order: size, decoding, then the `seq` held for the named node (a copy not newer than it is
/// ignored before any signature is checked: the common case, and the cheap one), then the full
/// [`check_record`] (signature, signer = the hotkey the record names, limits). Who published or
/// forwarded the message does not matter: every node forwards every node's records, and the
/// record itself binds hotkey, `PeerId` and content.
pub(super) fn judge(
    data: &[u8],
    directory: &Directory,
    own: &horde_protocol::Hotkey,
    now: UnixMillis,
) -> Verdict {
    if data.len() > MAX_RECORD_BYTES {
        return Verdict::Reject(RecordRejection::TooLarge("record message"));
    }
    // The record, alone (a first announcement) or followed by the one marker byte.
    let (signed, again) = match from_bytes_prefix::<Signed<NodeRecord>>(data) {
        Ok((signed, [])) => (signed, false),
        Ok((signed, [AGAIN])) => (signed, true),
        _ => return Verdict::Reject(RecordRejection::BadSignature),
    };
    if signed.signer() == own {
        return Verdict::Ignore("our own record");
    }
    // A record message names its signer; a copy not newer than what is held needs no signature
    // check (it changes nothing and is not forwarded); a copy of the very record held, not even
    // decoding. A second announcement of the very record held is forwarded (see
    // `encode_again`): the held copy was checked when it was kept.
    if directory.holds(&signed) {
        if again {
            return Verdict::Forward;
        }
        return Verdict::Ignore("not newer than the record held");
    }
    if let Some(held) = directory.seq_of(signed.signer())
        && let Ok(record) = from_bytes_exact::<NodeRecord>(signed.bytes())
        && record.seq <= held
    {
        return Verdict::Ignore("not newer than the record held");
    }
    let record = match check_record(&signed, now) {
        Ok(record) => record,
        Err(RecordRejection::Expired) => return Verdict::Ignore("expired"),
        Err(reason) => return Verdict::Reject(reason),
    };
    Verdict::Accept(Box::new((signed, record)))
}

/// The gossipsub router of a node (its messages are anonymous: the same for every identity).
pub fn behaviour() -> Result<gossipsub::Behaviour, String> {
    let config = gossipsub::ConfigBuilder::default()
        // horde's own mesh, apart from any public one.
        .protocol_id_prefix(horde_protocol::wire::DISCOVERY_GOSSIP)
        // D = 3: each node receives about as many copies of a record as it has mesh peers, and
        // record copies are most of an idle network's traffic at 256 nodes (every node's refresh
        // crosses every node). At 256 nodes, loopback bytes per node over a 90 s window holding
        // the refresh wave: D 6 → 4: 5.2 → 4.1 KB/s; D 4 → 3: 3.6 → 2.6 KB/s (`discovery-scale`,
        // 2026-12-06 08:34 / 08:51 UTC, one run each; convergence and capacity latency within
        // the spread of runs). A record still reaches 256 nodes in about log₂ 256 = 8 hops
        // (each node forwards to the 2 mesh peers it did not get it from; its source floods it
        // to all its ~8 peers).
        .mesh_n(3)
        // D_lo = 2, D_hi = 6: room for the mesh to grow and shrink without constant GRAFT/PRUNE
        // churn (a node has ~8 connections), while a node's mesh never thins to a single path.
        .mesh_n_low(2)
        .mesh_n_high(6)
        // At least 1 mesh peer this node dialed itself (below D_lo and at most D/2, as the
        // gossipsub v1.1 spec asks): an attacker accepting inbound connections alone cannot
        // fill a node's mesh.
        .mesh_outbound_min(1)
        // Gossip (IHAVE) to 2 non-mesh peers per heartbeat, never more (factor 0, else a
        // facilitator with 255 connections would gossip to 64): repairs a record a mesh path
        // lost, at a few hundred bytes a second of ids per node.
        .gossip_lazy(2)
        .gossip_factor(0.0)
        // IHAVE lists the ids of the last heartbeat only (default 3), of 5 kept for IWANT
        // answers: every id is announced once per gossip peer, not again a second later.
        .history_gossip(1)
        .history_length(5)
        // A peer pruned from a mesh may graft again after 15 s (libp2p: 60 s). While a network
        // starts, every node joins through the facilitator, whose mesh is oversubscribed with
        // ~255 peers and pruned to D at each heartbeat; the pruned peers (its own mesh dials
        // among them) and the facilitator then kept off each other's meshes for a minute, after
        // the joiners had left it: 45 s after a 256-node start its mesh was empty, records
        // reached it only by IHAVE (1 s later, or never: 2 of 16 capacity changes), capacity
        // p99 1,356 ms (`discovery-scale`, 2026-12-06 17:58 UTC). 15 s is still 15 heartbeats,
        // far above the GRAFT/PRUNE oscillation the backoff guards against.
        .prune_backoff(PRUNE_BACKOFF)
        // One heartbeat per second: mesh repair and gossip within a second, ~256 small control
        // frames per second in a 256-node network.
        .heartbeat_interval(Duration::from_secs(1))
        .heartbeat_initial_delay(Duration::from_millis(100))
        // A frame holds a few records and control lists; larger frames are refused unread.
        .max_transmit_size(MAX_TRANSMIT_SIZE)
        .max_ihave_length(MAX_IHAVE_LENGTH)
        // Ids are remembered for 2 minutes, the default record lifetime: a late copy of a message
        // within its useful life is dropped by id, without decoding or a signature check.
        .duplicate_cache_time(Duration::from_secs(120))
        // Records carry their own signature: gossipsub's own per-message signature would double
        // the verification work, and its unsigned author and sequence number fields prove
        // nothing (see the module doc): messages carry neither, and one that does is rejected.
        .validation_mode(ValidationMode::Anonymous)
        // A copy of a message this node published, coming back from a peer, is a duplicate
        // (dropped by id), not an offence. gossipsub's default calls it a "self-origin" message
        // and penalises the sender as for an invalid record (P₄, −10: below zero, so pruned
        // from the mesh and never grafted until it decays); with anonymous messages it cannot
        // tell a forger from an honest peer whose first copy came by another path, which in a
        // busy network is common. At 256 nodes the facilitator so penalised 11 of its peers
        // within 3 s of its start, and its mesh stayed at 0–4 peers ("Mesh low … Got 0 peers")
        // for the rest of the run; each capacity change a miner published cost it the peers
        // that echoed it.
        .allow_self_origin(true)
        // Nothing is forwarded before `judge` accepted it.
        .validate_messages()
        .message_id_fn(|message| message_id(&message.data))
        // Own records go to every subscribed peer (not only the mesh): a joining node's record
        // spreads before its mesh has formed.
        .flood_publish(true)
        // Per-peer send queue of 256 RPCs (half for forwarded records; preallocated, ~100 bytes
        // a slot): libp2p's 5000 preallocate ~650 KiB per connection, 40 MiB on a node with 64
        // peers. At 256 nodes the facilitator's 128 forward slots fill while the network starts;
        // what is dropped then reaches its peers by IHAVE or by the pull sync (task.rs), which
        // costs less than a queue for the whole network on each of the hub's 255 connections.
        .connection_handler_queue_len(QUEUE_LEN)
        // A forwarded record may wait 10 s for its connection (libp2p: 1 s): on a machine busy
        // starting hundreds of nodes a late copy still saves a pull; a record lives 120 s.
        .forward_queue_duration(Duration::from_secs(10))
        .publish_queue_duration(Duration::from_secs(10))
        // IDONTWANT only for messages of 1 KiB and more, i.e. never for a record (~170 bytes
        // signed): for a message this small the IDONTWANT frame to each mesh peer costs a
        // packet, as much as the duplicate it would save (at idle it doubled the packets a
        // node sent per record).
        .idontwant_message_size_threshold(IDONTWANT_MIN)
        .build()
        .map_err(|e| e.to_string())?;
    let mut behaviour = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, config)?;
    behaviour.with_peer_score(score_params(), score_thresholds())?;
    Ok(behaviour)
}

/// Peer scoring: punishes invalid records hard, rewards useful peers a little, and leaves out
/// the delivery-rate penalties that would punish honest peers of a quiet network.
fn score_params() -> PeerScoreParams {
    let topic = TopicScoreParams {
        // Each topic carries the whole score (the capacity topic has the same parameters).
        topic_weight: 1.0,
        // P1, up to +1 for ten minutes in the mesh: a small preference for stable peers.
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(6),
        time_in_mesh_cap: 100.0,
        // P2, up to +5 for records delivered first; decays within a minute.
        first_message_deliveries_weight: 0.5,
        first_message_deliveries_decay: 0.95,
        first_message_deliveries_cap: 10.0,
        // P3/P3b off: an idle network sends a few records a minute per peer, far below any rate
        // a mesh peer could be required to deliver.
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        // P4: -10 × (invalid records)²: one invalid record puts a peer at the gossip threshold,
        // two below the publish threshold, three graylist it; the count decays by 1% a second
        // (a graylisted peer is back after about 2 minutes of good behaviour).
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.99,
        ..TopicScoreParams::default()
    };
    let mut params = PeerScoreParams {
        // Caps the positive part, so past good behaviour cannot hide new invalid records.
        topic_score_cap: 10.0,
        // No application score is set.
        app_specific_weight: 0.0,
        // Off: many nodes legitimately share one IP (a host running several miners, a NAT, a
        // one-machine testnet); identities are hotkeys, not addresses.
        ip_colocation_factor_weight: 0.0,
        // P7 (broken IWANT promises, GRAFT during backoff): -10 × excess², as libp2p advises.
        behaviour_penalty_weight: -10.0,
        behaviour_penalty_threshold: 2.0,
        behaviour_penalty_decay: 0.9,
        // A penalised peer that reconnects keeps its score for 10 minutes.
        retain_score: Duration::from_secs(600),
        ..PeerScoreParams::default()
    };
    params.topics.insert(capacity_topic().hash(), topic.clone());
    params.topics.insert(topic_hash(), topic);
    params
}

fn topic_hash() -> gossipsub::TopicHash {
    topic().hash()
}

/// Score thresholds (see [`score_params`] for what moves a score).
pub fn score_thresholds() -> PeerScoreThresholds {
    PeerScoreThresholds {
        // Below -10 (one invalid record with nothing to offset it): no gossip to or from it.
        gossip_threshold: -10.0,
        // Below -30 (two invalid records): our own records are not flood-published to it.
        publish_threshold: -30.0,
        // Below -80 (three invalid records): everything it sends is ignored unread.
        graylist_threshold: -80.0,
        // Peer exchange is off; a high bar in case it is turned on.
        accept_px_threshold: 10.0,
        // Opportunistic grafting when the mesh's median score falls below +1.
        opportunistic_graft_threshold: 1.0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use horde_protocol::{ClassCapacity, ExecutorClass, Role, SecretKey, Signature};

    use super::super::directory::Offer;

    const NOW: UnixMillis = UnixMillis(1_000_000);

    fn record(key: &SecretKey, seq: u64, expires_at: u64, free: u32) -> NodeRecord {
        NodeRecord {
            hotkey: key.hotkey(),
            role: Role::Miner,
            addrs: vec![([127, 0, 0, 1], 4000).into()],
            p2p_addrs: vec![([127, 0, 0, 1], 5000).into()],
            capacity: vec![ClassCapacity {
                class: ExecutorClass("cpu".into()),
                free,
                total: 2,
            }],
            version: "test".into(),
            seq,
            expires_at: UnixMillis(expires_at),
            incarnation: UnixMillis(1),
        }
    }

    fn judged(directory: &Directory, signed: &Signed<NodeRecord>) -> Verdict {
        let own = SecretKey::generate().hotkey();
        judge(&encode(signed), directory, &own, NOW)
    }

    fn keep(directory: &Directory, verdict: Verdict) -> Offer {
        match verdict {
            Verdict::Accept(accepted) => {
                let (signed, record) = *accepted;
                directory.offer(signed, record)
            }
            other => panic!("not accepted: {other:?}"),
        }
    }

    #[test]
    fn bad_signature_signer_and_size_are_rejected() {
        let directory = Directory::default();
        let key = SecretKey::generate();
        let good = Signed::sign(&key, &record(&key, 1, NOW.0 + 5000, 1));
        let mut signature = *good.signature().as_bytes();
        signature[3] ^= 1;
        let tampered = Signed::from_parts(
            good.bytes().to_vec(),
            key.hotkey(),
            Signature::from_bytes(signature),
        );
        assert!(matches!(
            judged(&directory, &tampered),
            Verdict::Reject(RecordRejection::BadSignature)
        ));
        // Signed by another key than the one it names.
        let other = SecretKey::generate();
        let misnamed = Signed::sign(&other, &record(&key, 1, NOW.0 + 5000, 1));
        assert!(matches!(
            judged(&directory, &misnamed),
            Verdict::Reject(RecordRejection::SignerMismatch { .. })
        ));
        // Too big, and not a record at all.
        let own = other.hotkey();
        let big = vec![0u8; MAX_RECORD_BYTES + 1];
        assert!(matches!(
            judge(&big, &directory, &own, NOW),
            Verdict::Reject(RecordRejection::TooLarge(_))
        ));
        assert!(matches!(
            judge(&[1, 2, 3], &directory, &own, NOW),
            Verdict::Reject(_)
        ));
        // Nothing of it was kept; the genuine record from its own node is.
        assert_eq!(directory.seq_of(&key.hotkey()), None);
        assert_eq!(keep(&directory, judged(&directory, &good)), Offer::New);
    }

    #[test]
    fn a_second_announcement_is_forwarded_unchecked_only_where_its_record_is_held() {
        let directory = Directory::default();
        let own = SecretKey::generate().hotkey();
        let key = SecretKey::generate();
        let signed = Signed::sign(&key, &record(&key, 5, NOW.0 + 5000, 1));
        let again = encode_again(&signed);
        assert_ne!(message_id(&again), message_id(&encode(&signed)));
        // Lacking the record: checked in full and kept.
        assert_eq!(
            keep(&directory, judge(&again, &directory, &own, NOW)),
            Offer::New
        );
        // Holding it: forwarded, nothing kept; the first announcement is ignored.
        assert!(matches!(
            judge(&again, &directory, &own, NOW),
            Verdict::Forward
        ));
        assert!(matches!(judged(&directory, &signed), Verdict::Ignore(_)));
        // An older record announced again is ignored, not forwarded.
        let older = Signed::sign(&key, &record(&key, 4, NOW.0 + 5000, 1));
        assert!(matches!(
            judge(&encode_again(&older), &directory, &own, NOW),
            Verdict::Ignore(_)
        ));
        // A forged second announcement is checked and its sender blamed.
        let other = SecretKey::generate();
        let mut forged = encode_again(&Signed::sign(&other, &record(&other, 9, NOW.0 + 5000, 1)));
        let signature_byte = forged.len() - 2;
        forged[signature_byte] ^= 1;
        assert!(matches!(
            judge(&forged, &directory, &own, NOW),
            Verdict::Reject(_)
        ));
        // Any other trailing byte, or two, is not a record message.
        for tail in [&[2u8][..], &[AGAIN, AGAIN][..]] {
            let mut data = encode(&signed);
            data.extend_from_slice(tail);
            assert!(matches!(
                judge(&data, &directory, &own, NOW),
                Verdict::Reject(RecordRejection::BadSignature)
            ));
        }
    }

    #[test]
    fn stale_and_expired_records_are_ignored() {
        let directory = Directory::default();
        let key = SecretKey::generate();
        let newer = Signed::sign(&key, &record(&key, 5, NOW.0 + 5000, 1));
        assert_eq!(keep(&directory, judged(&directory, &newer)), Offer::New);
        for seq in [4, 5] {
            let older = Signed::sign(&key, &record(&key, seq, NOW.0 + 9000, 1));
            assert!(matches!(judged(&directory, &older), Verdict::Ignore(_)));
        }
        let other = SecretKey::generate();
        let expired = Signed::sign(&other, &record(&other, 9, NOW.0, 1));
        assert!(matches!(
            judged(&directory, &expired),
            Verdict::Ignore("expired")
        ));
        // Our own record coming back is ignored, not blamed.
        assert!(matches!(
            judge(&encode(&newer), &directory, &key.hotkey(), NOW),
            Verdict::Ignore(_)
        ));
    }

    #[test]
    fn a_forged_next_seq_cannot_suppress_the_real_record() {
        let directory = Directory::default();
        let victim = SecretKey::generate();
        let first = Signed::sign(&victim, &record(&victim, 1, NOW.0 + 5000, 1));
        keep(&directory, judged(&directory, &first));
        // The attacker sends the victim's next seq first: same (hotkey, seq), bytes of its own,
        // the victim's hotkey as signer and any signature.
        let real = Signed::sign(&victim, &record(&victim, 2, NOW.0 + 5000, 0));
        let rogue = SecretKey::generate();
        let forged_record = record(&victim, 2, NOW.0 + 5000, 99);
        let forged = Signed::from_parts(
            to_bytes(&forged_record),
            victim.hotkey(),
            *Signed::sign(&rogue, &forged_record).signature(),
        );
        let (forged_id, real_id) = (message_id(&encode(&forged)), message_id(&encode(&real)));
        // Different records, different ids: the real one is no duplicate of the forgery.
        assert_ne!(forged_id, real_id);
        assert!(matches!(
            judged(&directory, &forged),
            Verdict::Reject(RecordRejection::BadSignature)
        ));
        // The real record still arrives, is accepted and wins.
        assert_eq!(keep(&directory, judged(&directory, &real)), Offer::Updated);
        assert_eq!(
            directory.get(&victim.hotkey(), NOW).unwrap().capacity[0].free,
            0
        );
        // The same bytes always have the same id (a re-sent copy is a duplicate).
        assert_eq!(message_id(&encode(&real)), real_id);
    }

    #[test]
    fn the_router_settings_are_accepted_by_libp2p() {
        assert!(behaviour().is_ok());
        assert!(score_params().validate().is_ok());
        assert!(score_thresholds().validate().is_ok());
    }
}
