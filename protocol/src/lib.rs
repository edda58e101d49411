//! horde-protocol: the wire types of horde, sans-IO.
//!
//! - [`keys`]: [`Hotkey`] (ed25519 public key, SS58/hex), [`SecretKey`] (zeroized), key files.
//! - [`signed`]: [`Signed<T>`], exact bytes + signer + signature over `domain ‖ bytes`.
//! - [`blob`]: the `horde/blob/1` messages and the verified-streaming tree (chunk groups, outboards).
//! - [`codec`]: `u32` big-endian length + postcard frames, capped before allocation.
//! - [`job`]: the client-signed [`JobSpec`] and what it is made of (volumes, uploads, deadlines).
//! - [`records`]: signed records: endpoint record, node record, tunnel receipts, miner reports.
//! - [`spec_check`]: checks on a spec that need no executor (paths, readiness, deadline bounds).
//! - [`messages`]: the job-session messages relayed hop by hop, statuses, tunnel frames.
//! - [`accounting`]: accounting receipts (job started / accepted / finished), signed by the
//!   validator and countersigned by the miner.
//! - [`wire`]: every versioned name and code on the wire (ALPNs, error and stop codes, discovery
//!   protocol names, signature domain tags) in one append-only table, and the rule for changing
//!   the wire.
//!
//! Layout: one file per module above: `keys.rs`, `signed.rs`, `blob.rs`, `codec.rs`, `job.rs`,
//! `records.rs`, `spec_check.rs`, `messages.rs`, `accounting.rs`, `wire.rs`.
//!
//! No tokio, no sockets, no clock: times are passed in as [`UnixMillis`]. Every enum is
//! append-only; a breaking change bumps the ALPN version.

#![deny(missing_docs)]

pub mod accounting;
pub mod blob;
pub mod codec;
pub mod job;
pub mod keys;
pub mod messages;
pub mod records;
pub mod signed;
pub mod spec_check;
pub mod wire;

pub use accounting::{
    AccountingReceipt, AccountingRecord, Countersignature, JobOutcome, ReceiptError, ReceiptKind,
    VerifiedRecord, verify_receipt,
};
pub use codec::{DecodeError, FrameError, MAX_FRAME_LEN};
pub use job::{
    BlobHash, Deadlines, ExecutorClass, JobId, JobSpec, MAX_CLOCK_SKEW_MS, NodeAddr, Program,
    ReadinessProbe, RelativePath, Stage, TerminateRequest, UnixMillis, UploadSpec, UploadTarget,
    VolumeList, VolumeSource, VolumeSpec,
};
pub use keys::{Hotkey, HotkeyVerifier, KeyError, KeyFileError, SecretKey, SignatureError};
pub use messages::{
    ClientMessageError, ControlMessage, DownMessage, JobStatus, TunnelFrame, UpMessage,
};
pub use records::{
    ClassCapacity, EndpointRecord, JobReceipt, MinerReport, NodeRecord, RecordSync, ReportError,
    Role, STORAGE_CAPACITY_CLASS, VerifiedReport, verify_report,
};
pub use signed::{Signable, Signature, Signed, VerifyError};
pub use spec_check::{PathError, SpecFieldError};

#[cfg(test)]
mod arbitrary {
    //! proptest strategies for the types that cannot derive them (keys and signatures).
    use proptest::prelude::*;

    use crate::keys::{Hotkey, SecretKey};
    use crate::signed::{Signable, Signature, Signed};

    /// Socket addresses as they survive serde: IPv6 flow info and scope id are not encoded.
    pub(crate) fn socket_addr() -> impl Strategy<Value = std::net::SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| (ip, port).into()),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| (ip, port).into()),
        ]
    }

    pub(crate) fn socket_addrs() -> impl Strategy<Value = Vec<std::net::SocketAddr>> {
        proptest::collection::vec(socket_addr(), 0..4)
    }

    impl Arbitrary for Hotkey {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with((): ()) -> Self::Strategy {
            any::<[u8; 32]>()
                .prop_map(|seed| SecretKey::from_seed(&seed).hotkey())
                .boxed()
        }
    }

    impl Arbitrary for Signature {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with((): ()) -> Self::Strategy {
            (any::<[u8; 32]>(), any::<[u8; 32]>())
                .prop_map(|(a, b)| {
                    let mut bytes = [0u8; 64];
                    bytes[..32].copy_from_slice(&a);
                    bytes[32..].copy_from_slice(&b);
                    Signature::from_bytes(bytes)
                })
                .boxed()
        }
    }

    impl<T: Signable + Arbitrary + 'static> Arbitrary for Signed<T> {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with((): ()) -> Self::Strategy {
            (any::<T>(), any::<[u8; 32]>())
                .prop_map(|(value, seed)| Signed::sign(&SecretKey::from_seed(&seed), &value))
                .boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    //! Round trips for every message type, and hex snapshots pinning the wire format.
    use proptest::prelude::*;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use super::*;
    use crate::codec::{from_bytes_exact, to_bytes};
    use crate::messages::*;
    use crate::records::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
        let bytes = to_bytes(value);
        let back: T = from_bytes_exact(&bytes).expect("decodes");
        assert_eq!(&back, value);
        // Every proper prefix fails to decode (or decodes with a different value): no message is
        // silently accepted truncated.
        if let Some(cut) = bytes.len().checked_sub(1) {
            let truncated: Result<T, _> = from_bytes_exact(&bytes[..cut]);
            assert!(truncated.as_ref().map(|t| t != value).unwrap_or(true));
        }
    }

    /// Runs a round trip over 64 generated values on a thread with a large stack: the strategies
    /// for the deeply nested message enums overflow the default test stack in debug builds.
    fn check_round_trips<T>()
    where
        T: Arbitrary + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + 'static,
    {
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(|| {
                let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
                    cases: 64,
                    ..ProptestConfig::default()
                });
                runner
                    .run(&any::<T>(), |value| {
                        round_trip(&value);
                        Ok(())
                    })
                    .unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }

    macro_rules! round_trips {
        ($($name:ident: $ty:ty),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    check_round_trips::<$ty>();
                }
            )*
        };
    }

    round_trips! {
        rt_hotkey: Hotkey,
        rt_job_id: JobId,
        rt_blob_hash: BlobHash,
        rt_node_addr: NodeAddr,
        rt_deadlines: Deadlines,
        rt_stage: Stage,
        rt_readiness: ReadinessProbe,
        rt_program: Program,
        rt_volume_source: VolumeSource,
        rt_volume_spec: VolumeSpec,
        rt_upload_target: UploadTarget,
        rt_upload_spec: UploadSpec,
        rt_job_spec: JobSpec,
        rt_signed_job_spec: Signed<JobSpec>,
        rt_volume_list: Signed<VolumeList>,
        rt_terminate: Signed<TerminateRequest>,
        rt_role: Role,
        rt_endpoint_record: Signed<EndpointRecord>,
        rt_class_capacity: ClassCapacity,
        rt_node_record: Signed<NodeRecord>,
        rt_record_sync: RecordSync,
        rt_client_stream_signature: Signed<ClientStreamSignature>,
        rt_job_receipt: Signed<JobReceipt>,
        rt_miner_report: Signed<MinerReport>,
        rt_control: ControlMessage,
        rt_down: DownMessage,
        rt_up: UpMessage,
        rt_assignment: Assignment,
        rt_initial_details: InitialJobDetails,
        rt_job_details: JobDetails,
        rt_endpoint_ready: EndpointReady,
        rt_decline: DeclineReason,
        rt_reject: RejectReason,
        rt_failure_reason: FailureReason,
        rt_job_failure: JobFailure,
        rt_horde_failure: HordeFailure,
        rt_output_ref: OutputRef,
        rt_upload_done: UploadDone,
        rt_job_finished: JobFinished,
        rt_job_status: JobStatus,
        rt_status_update: StatusUpdate,
        rt_registration: ExecutorRegistration,
        rt_verdict: ReportVerdict,
        rt_tunnel_frame: TunnelFrame,
        rt_receipt_kind: ReceiptKind,
        rt_job_outcome: JobOutcome,
        rt_accounting_receipt: Signed<AccountingReceipt>,
        rt_countersignature: Countersignature,
        rt_accounting_record: AccountingRecord,
        rt_receipt_reply: ReceiptReply,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn signed_messages_verify_after_round_trip(value in any::<Signed<EndpointRecord>>()) {
            let back: Signed<EndpointRecord> = from_bytes_exact(&to_bytes(&value)).unwrap();
            prop_assert!(back.verify().is_ok());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = from_bytes_exact::<ControlMessage>(&bytes);
            let _ = from_bytes_exact::<TunnelFrame>(&bytes);
            let _ = crate::codec::decode_frame::<ControlMessage>(&bytes, MAX_FRAME_LEN);
        }
    }

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed(&[seed; 32])
    }

    fn sample_spec() -> JobSpec {
        JobSpec {
            job_id: JobId([0x11; 16]),
            executor_class: ExecutorClass("cpu-small".into()),
            program: Program::Command {
                program: "demo-job".into(),
            },
            args: vec!["--port".into()],
            env: vec![("K".into(), "V".into())],
            deadlines: Deadlines {
                reservation_ms: 1,
                executor_startup_ms: 2,
                volume_download_ms: 3,
                readiness_ms: 4,
                execution_ms: 5,
                upload_ms: 6,
            },
            readiness: ReadinessProbe::default(),
            volumes: vec![VolumeSpec {
                path: RelativePath("in.txt".into()),
                source: VolumeSource::Inline {
                    bytes: b"hi".to_vec(),
                },
            }],
            uploads: vec![],
            logs: None,
            client_key: key(2).hotkey(),
            on_trusted_miner: false,
            nonce: [0x22; 16],
            issued_at: UnixMillis(1_000),
            expires_at: UnixMillis(2_000),
        }
    }

    /// Pins the encoding of a job spec: changing it breaks every deployed peer and must bump the
    /// ALPN version instead.
    #[test]
    fn snapshot_job_spec() {
        let hex = hex::encode(to_bytes(&sample_spec()));
        assert_eq!(
            hex,
            "11111111111111111111111111111111096370752d736d616c6c000864656d6f2d6a6f6201062d2d706f72\
             7401014b015601020304050600072f6865616c74680106696e2e7478740202686900008139770ea87d175f56\
             a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b3940022222222222222222222222222222222e807d00f"
        );
    }

    /// Pins the encoding of `Program`: `ImageBlob` was appended (variant 2), so the variants
    /// before it keep their tags.
    #[test]
    fn snapshot_program() {
        let image = Program::Image {
            reference: "a".into(),
        };
        assert_eq!(hex::encode(to_bytes(&image)), "010161");
        let blob = Program::ImageBlob {
            hash: BlobHash([0xab; 32]),
            size: 300,
            storage: NodeAddr {
                hotkey: key(7).hotkey(),
                addrs: vec!["127.0.0.1:4000".parse().unwrap()],
            },
        };
        let bytes = to_bytes(&blob);
        assert_eq!(bytes[0], 2, "ImageBlob is the third variant");
        assert_eq!(
            hex::encode(&bytes[1..35]),
            format!("{}ac02", "ab".repeat(32))
        );
        assert_eq!(from_bytes_exact::<Program>(&bytes).unwrap(), blob);
    }

    /// Pins the failure reasons' tags: variants are append-only, so `OverDiskLimit` (the
    /// newest) is tag 9 and every older tag stays where it was.
    #[test]
    fn snapshot_failure_reasons() {
        let cases = [
            (FailureReason::Timeout, "00"),
            (FailureReason::NonZeroExit(3), "0106"),
            (FailureReason::Signal(9), "0212"),
            (FailureReason::VolumeFetch("v".into()), "030176"),
            (FailureReason::Upload("u".into()), "040175"),
            (FailureReason::Spawn("s".into()), "050173"),
            (FailureReason::BadEndpointRecord("b".into()), "060162"),
            (FailureReason::OutOfMemory, "07"),
            (FailureReason::Lost("l".into()), "08016c"),
            (FailureReason::OverDiskLimit("d".into()), "090164"),
        ];
        for (reason, hex) in cases {
            assert_eq!(hex::encode(to_bytes(&reason)), hex, "{reason:?}");
        }
    }

    /// Pins the output locations' tags: `NotUploaded` was appended (tag 2), so a `Blob` or
    /// `Url` output still encodes as before.
    #[test]
    fn snapshot_output_locations() {
        let url = OutputLocation::Url("u".into());
        assert_eq!(hex::encode(to_bytes(&url)), "010175");
        let failed = OutputLocation::NotUploaded {
            target: "t".into(),
            reason: "r".into(),
        };
        assert_eq!(hex::encode(to_bytes(&failed)), "0201740172");
        let output = OutputRef {
            path: RelativePath("stdout".into()),
            size: 1,
            hash: BlobHash([0; 32]),
            location: failed,
        };
        let bytes = to_bytes(&output);
        assert_eq!(from_bytes_exact::<OutputRef>(&bytes).unwrap(), output);
    }

    /// Pins the reject reasons' tags: `WarmingUp` (11), `AllBusy` (12) and `StoreFailed` (13)
    /// were appended, so the older tags stay where they were.
    #[test]
    fn snapshot_reject_reasons() {
        let cases = [
            (RejectReason::BadSignature, "00"),
            (RejectReason::NoMiner, "05"),
            (RejectReason::NotOwner, "0a"),
            (
                RejectReason::WarmingUp {
                    retry_after_ms: 1000,
                },
                "0be807",
            ),
            (
                RejectReason::AllBusy {
                    class: ExecutorClass("cpu".into()),
                    executors: 3,
                },
                "0c0363707503",
            ),
            (RejectReason::StoreFailed("disk".into()), "0d046469736b"),
        ];
        for (reason, hex) in cases {
            assert_eq!(hex::encode(to_bytes(&reason)), hex, "{reason:?}");
            assert_eq!(
                from_bytes_exact::<RejectReason>(&hex::decode(hex).unwrap()).unwrap(),
                reason
            );
        }
    }

    /// Pins `DownMessage::Resume`'s tag: appended as variant 7.
    #[test]
    fn snapshot_resume() {
        let resume = DownMessage::Resume(JobId([0xab; 16]));
        assert_eq!(
            hex::encode(to_bytes(&resume)),
            "07abababababababababababababababab"
        );
    }

    /// Pins the hand-over's two appended tags: `DownMessage::Proceed` is variant 8,
    /// `UpMessage::AssignmentReceived` variant 12.
    #[test]
    fn snapshot_hand_over() {
        assert_eq!(hex::encode(to_bytes(&DownMessage::Proceed)), "08");
        assert_eq!(hex::encode(to_bytes(&UpMessage::AssignmentReceived)), "0c");
    }

    #[test]
    fn snapshot_tunnel_data() {
        let frame = TunnelFrame::Data(b"GET /".to_vec());
        assert_eq!(hex::encode(to_bytes(&frame)), "0005474554202f");
    }

    #[test]
    fn snapshot_status_update() {
        let update = StatusUpdate {
            job_id: JobId([0xab; 16]),
            seq: 3,
            at: UnixMillis(300),
            status: JobStatus::VolumesFetched { volume_msg_id: 7 },
        };
        assert_eq!(
            hex::encode(to_bytes(&ControlMessage::Up(UpMessage::Status(update)))),
            "010aabababababababababababababababab03ac020507"
        );
    }

    #[test]
    fn snapshot_signed_endpoint_record() {
        let miner = key(3);
        let record = EndpointRecord {
            job_id: JobId([1; 16]),
            miner: miner.hotkey(),
            address: "127.0.0.1:4000".parse().unwrap(),
            job_key: key(4).hotkey(),
            expires_at: UnixMillis(5),
        };
        let signed = Signed::sign(&miner, &record);
        // ed25519 signatures are deterministic, so the whole envelope is pinned.
        let hex = hex::encode(to_bytes(&signed));
        let back: Signed<EndpointRecord> = from_bytes_exact(&to_bytes(&signed)).unwrap();
        assert_eq!(back.verify_by(&miner.hotkey()).unwrap(), record);
        assert_eq!(
            hex, SNAPSHOT_SIGNED_ENDPOINT_RECORD,
            "wire format of Signed<EndpointRecord> changed"
        );
    }

    /// Pins the encoding of a countersigned accounting record, and that it still verifies.
    #[test]
    fn snapshot_accounting_record() {
        let (validator, miner) = (key(5), key(6));
        let receipt = Signed::sign(
            &validator,
            &AccountingReceipt {
                kind: ReceiptKind::Finished {
                    outcome: JobOutcome::TimedOut {
                        stage: Stage::Execution,
                    },
                    started_at: UnixMillis(1_000),
                    time_took_ms: 250,
                },
                job_id: JobId([2; 16]),
                validator: validator.hotkey(),
                miner: miner.hotkey(),
                executor_class: ExecutorClass("cpu".into()),
                issued_at: UnixMillis(1_250),
            },
        );
        let record = AccountingRecord {
            countersignature: Some(Countersignature::sign(&miner, &receipt)),
            receipt,
        };
        let bytes = to_bytes(&record);
        let back: AccountingRecord = from_bytes_exact(&bytes).unwrap();
        assert!(back.verify_countersigned().is_ok());
        assert_eq!(
            hex::encode(&bytes),
            SNAPSHOT_ACCOUNTING_RECORD,
            "wire format of AccountingRecord changed"
        );
    }

    const SNAPSHOT_ACCOUNTING_RECORD: &str = concat!(
        "5d020204e807fa01020202020202020202020202020202026e7a1cdd29b0b78fd13af4c5598feff4ef2a9716",
        "6e3ca6f2e4fbfccd80505bf18a875fff1eb38451577acd5afee405456568dd7c89e090863a0557bc7af49f17",
        "03637075e2096e7a1cdd29b0b78fd13af4c5598feff4ef2a97166e3ca6f2e4fbfccd80505bf140c3b5ef00db",
        "bb73bb8be442e081744ba00de9ef9bdfd829ef51ecc1946903b23ab36121b8984d311ad5e12867eedd299d18",
        "ce0ea79ea3d4cd7b0aed432bc9fa07018a875fff1eb38451577acd5afee405456568dd7c89e090863a0557bc",
        "7af49f1740138fc350f270a29d410d3655975aaaf98aef5eef36d682bad5cc99c43ff27d45064850887464ee",
        "fe81079349e3c144b2558ee2bddcdec99e9de771e1210d9a0b",
    );

    const SNAPSHOT_SIGNED_ENDPOINT_RECORD: &str = concat!(
        "5801010101010101010101010101010101ed4928c628d1c2c6eae90338905995612959273a5c63f93636c146",
        "14ac8737d1007f000001a01fca93ac1705187071d67b83c7ff0efe8108e8ec4530575d7726879333dbdabe7c",
        "05ed4928c628d1c2c6eae90338905995612959273a5c63f93636c14614ac8737d140388580eac60835b996dd",
        "ea31a44b852ba9e72f095b42e6de5aca73e1f80415b5bb923a60819cffca0f4c5db3098dbf35bf8399d14c26",
        "63e3f712d0b7a663f901"
    );
}
