//! The storage role and the blob client over real QUIC connections on 127.0.0.1.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use horde_node::client::blob::{
    self, GetOutcome, TransferError, TransferPolicy, get_to_file, get_to_file_once, get_to_memory,
    put_file, put_file_once,
};
use horde_node::client::progress::{NoProgress, Progress};
use horde_node::server::storage::{BlobStore, StoreLimits, serve};
use horde_protocol::blob::{
    BlobErrorKind, BlobRequest, BlobResponse, BlobStatus, ByteRange, CHUNK_GROUP_LEN,
    MAX_REQUEST_LEN, Outboard, Piece, SEGMENT_LEN, normalize_ranges, plan,
};
use horde_protocol::codec::encode_frame;
use horde_protocol::{BlobHash, NodeAddr, SecretKey};
use horde_transport::blob::{
    BlobBuffer, BlobError, MAPPED_MIN, PROGRESS_TIMEOUT, put_bytes, read_request, request_get,
    start_put, stat, write_response,
};
use horde_transport::test_utils::{localhost_endpoint, seeded_key};
use horde_transport::{FrameReader, HordeEndpoint, codes};
use tokio_util::sync::CancellationToken;

const NO_LIMIT: u64 = u64::MAX;

struct Storage {
    dir: tempfile::TempDir,
    store: Arc<BlobStore>,
    addr: NodeAddr,
    cancel: CancellationToken,
}

impl Drop for Storage {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn start_storage(limits: StoreLimits) -> Storage {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), limits).unwrap());
    let endpoint = Arc::new(localhost_endpoint(&seeded_key(20)));
    let addr = NodeAddr {
        hotkey: endpoint.hotkey(),
        addrs: vec![endpoint.local_addr().unwrap()],
    };
    let cancel = CancellationToken::new();
    tokio::spawn(serve(endpoint, Arc::clone(&store), cancel.clone()));
    Storage {
        dir,
        store,
        addr,
        cancel,
    }
}

fn client() -> HordeEndpoint {
    localhost_endpoint(&seeded_key(1))
}

/// A storage node, a client endpoint and one connection between them.
struct Fixture {
    storage: Storage,
    client: HordeEndpoint,
    connection: quinn::Connection,
}

impl Fixture {
    async fn start(limits: StoreLimits) -> Self {
        let storage = start_storage(limits);
        let client = client();
        let connection = blob::connect(&client, &storage.addr).await.unwrap();
        Self {
            storage,
            client,
            connection,
        }
    }

    /// A fresh connection to the storage node.
    async fn connect(&self) -> quinn::Connection {
        blob::connect(&self.client, &self.storage.addr)
            .await
            .unwrap()
    }

    /// [`get_to_file`] with retries, no expected size, no limit and no progress.
    async fn get_file(&self, hash: BlobHash, dest: &Path) -> Result<GetOutcome, TransferError> {
        get_to_file(
            &self.client,
            &self.storage.addr,
            hash,
            dest,
            None,
            NO_LIMIT,
            &TransferPolicy::default(),
            &mut NoProgress,
        )
        .await
    }

    /// [`get_to_memory`] with the default policy.
    async fn get_memory(&self, hash: BlobHash, max_size: u64) -> Result<Bytes, TransferError> {
        let policy = TransferPolicy::default();
        get_to_memory(
            &self.client,
            &self.storage.addr,
            hash,
            max_size,
            &policy,
            &mut NoProgress,
        )
        .await
    }

    /// Flips one bit of the stored blob's byte at `offset`, on disk.
    fn corrupt(&self, hash: &BlobHash, offset: u64) {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.storage.store.blob_path(hash))
            .unwrap();
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, offset).unwrap();
        file.write_all_at(&[byte[0] ^ 0x01], offset).unwrap();
    }
}

fn sample(len: usize, seed: u8) -> Vec<u8> {
    let mut state = u64::from(seed) + 1;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test]
async fn put_then_get_stat_and_not_found() {
    let fixture = Fixture::start(StoreLimits::default()).await;
    let (storage, client) = (&fixture.storage, &fixture.client);
    let work = tempfile::tempdir().unwrap();
    // Sizes around every boundary of the tree: empty, one group, a partial group, two segments.
    for (index, len) in [
        0,
        1,
        CHUNK_GROUP_LEN as usize,
        CHUNK_GROUP_LEN as usize + 1,
        SEGMENT_LEN as usize + 3 * CHUNK_GROUP_LEN as usize + 7,
    ]
    .into_iter()
    .enumerate()
    {
        let bytes = sample(len, index as u8);
        let source = write_file(work.path(), &format!("in{index}"), &bytes);
        let hash = put_file(
            client,
            &storage.addr,
            &source,
            &TransferPolicy::default(),
            &mut NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(hash, BlobHash::of(&bytes), "len {len}");
        let dest = work.path().join(format!("out{index}"));
        let outcome = get_to_file(
            client,
            &storage.addr,
            hash,
            &dest,
            Some(len as u64),
            NO_LIMIT,
            &TransferPolicy::default(),
            &mut NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(outcome.size, len as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), bytes, "len {len}");
        let memory = get_to_memory(
            client,
            &storage.addr,
            hash,
            NO_LIMIT,
            &TransferPolicy::default(),
            &mut NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(memory, bytes);
        assert_eq!(
            stat(&fixture.connect().await, hash).await.unwrap(),
            BlobStatus::Complete { size: len as u64 }
        );
    }

    let absent = BlobHash([7; 32]);
    assert_eq!(
        stat(&fixture.connection, absent).await.unwrap(),
        BlobStatus::Absent
    );
    let dest = work.path().join("absent");
    let error = fixture.get_file(absent, &dest).await.unwrap_err();
    assert!(
        matches!(error, TransferError::Blob(BlobError::NotFound(hash)) if hash == absent),
        "{error:?}"
    );
    assert!(!dest.exists());
}

#[tokio::test]
async fn corrupted_blob_is_rejected_within_one_group_and_leaves_nothing() {
    let fixture = Fixture::start(StoreLimits::default()).await;
    let bytes = sample(2 * SEGMENT_LEN as usize + 1000, 3);
    let hash = put_bytes(&fixture.connection, Bytes::from(bytes.clone()))
        .await
        .unwrap();

    // Flip one byte of the stored blob on disk, in the second segment.
    let flipped = SEGMENT_LEN + 300_000;
    fixture.corrupt(&hash, flipped);

    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("out");
    let error = fixture.get_file(hash, &dest).await.unwrap_err();
    let group_start = flipped / CHUNK_GROUP_LEN * CHUNK_GROUP_LEN;
    assert!(
        matches!(error, TransferError::Blob(BlobError::Integrity { offset }) if offset == group_start),
        "{error:?}"
    );
    assert!(error.is_integrity());
    let leftovers: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // In memory too.
    let error = fixture.get_memory(hash, NO_LIMIT).await.unwrap_err();
    assert!(error.is_integrity(), "{error:?}");
}

/// Records every progress call.
#[derive(Debug, Default)]
struct Recorded {
    starts: Vec<(u64, u64)>,
    updates: Vec<u64>,
    finished: usize,
}

impl Progress for Recorded {
    fn start(&mut self, total: u64, done: u64) {
        self.starts.push((total, done));
    }

    fn update(&mut self, done: u64) {
        self.updates.push(done);
    }

    fn finish(&mut self) {
        self.finished += 1;
    }
}

#[tokio::test]
async fn a_download_into_memory_reports_its_verified_progress() {
    let fixture = Fixture::start(StoreLimits::default()).await;
    let size = 2 * SEGMENT_LEN as usize + 1000;
    let bytes = sample(size, 5);
    let hash = put_bytes(&fixture.connection, Bytes::from(bytes.clone()))
        .await
        .unwrap();
    let policy = TransferPolicy::default();
    let storage = &fixture.storage.addr;

    let mut whole = Recorded::default();
    let got = get_to_memory(
        &fixture.client,
        storage,
        hash,
        NO_LIMIT,
        &policy,
        &mut whole,
    )
    .await
    .unwrap();
    assert_eq!(got, bytes);
    assert_eq!(whole.starts, [(size as u64, 0)]);
    assert_eq!(whole.updates.last(), Some(&(size as u64)));
    assert!(whole.updates.is_sorted(), "{:?}", whole.updates);
    assert_eq!(whole.finished, 1);

    // A transfer that stops midway has told how far it got: the verified prefix, before the
    // corrupted group.
    let flipped = SEGMENT_LEN + 300_000;
    fixture.corrupt(&hash, flipped);
    let mut cut = Recorded::default();
    let error = get_to_memory(&fixture.client, storage, hash, NO_LIMIT, &policy, &mut cut)
        .await
        .unwrap_err();
    assert!(error.is_integrity(), "{error:?}");
    assert_eq!(cut.starts, [(size as u64, 0)]);
    let reached = *cut.updates.last().expect("progress before the failure");
    assert!(reached > 0 && reached <= flipped, "{:?}", cut.updates);
    assert_eq!(cut.finished, 1);
}

/// Closes the connection once half the blob has been verified; remembers the last progress.
struct CutAtHalf {
    connection: quinn::Connection,
    total: u64,
    done: u64,
}

impl Progress for CutAtHalf {
    fn start(&mut self, total: u64, done: u64) {
        self.total = total;
        self.done = done;
    }

    fn update(&mut self, done: u64) {
        self.done = done;
        if done >= self.total / 2 {
            self.connection.close(0u32.into(), b"cut by the test");
        }
    }
}

#[tokio::test]
async fn cut_download_resumes_with_only_the_missing_range() {
    let fixture = Fixture::start(StoreLimits::default()).await;
    let size = 2 * SEGMENT_LEN as usize + 12_345;
    let bytes = sample(size, 4);
    let hash = fixture.storage.store.insert(&bytes).unwrap();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("out");

    let connection = fixture.connection.clone();
    let mut cut = CutAtHalf {
        connection: connection.clone(),
        total: 0,
        done: 0,
    };
    let error = get_to_file_once(
        &connection,
        hash,
        &dest,
        None,
        NO_LIMIT,
        PROGRESS_TIMEOUT,
        &mut cut,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, TransferError::Blob(ref e) if e.is_transient()),
        "{error:?}"
    );
    assert!(
        !dest.exists(),
        "no file at the destination before completion"
    );
    let verified_before_cut = cut.done;
    assert!(verified_before_cut >= size as u64 / 2 && verified_before_cut < size as u64);

    let connection = fixture.connect().await;
    let outcome = get_to_file_once(
        &connection,
        hash,
        &dest,
        None,
        NO_LIMIT,
        PROGRESS_TIMEOUT,
        &mut NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert_eq!(BlobHash::of(&std::fs::read(&dest).unwrap()), hash);
    // Every verified byte was kept: the resume starts where the verified data ended, rounded
    // down to a chunk group.
    assert!(outcome.resumed_from + CHUNK_GROUP_LEN > verified_before_cut);
    let missing = size as u64 - verified_before_cut;
    // Data re-fetched ≤ missing + one group; the CV blocks of the segments touched come on top.
    let cv_blocks = 2 * 1024 * 32;
    assert!(
        outcome.fetched <= missing + CHUNK_GROUP_LEN + cv_blocks,
        "fetched {} for {missing} missing",
        outcome.fetched
    );
    assert!(!work.path().join("out.partial").exists());
}

#[tokio::test]
async fn memory_get_continues_from_a_verified_prefix() {
    let fixture = Fixture::start(StoreLimits::default()).await;
    let size = 2 * SEGMENT_LEN as usize + 4321;
    let bytes = sample(size, 7);
    let hash = fixture.storage.store.insert(&bytes).unwrap();
    // A verified prefix ending mid-segment on a group boundary: the rest is written in place
    // after it, through the thread that faults the destination in.
    let held = SEGMENT_LEN as usize + 5 * CHUNK_GROUP_LEN as usize;
    let mut buffer = bytes[..held].to_vec();
    let fetched = blob::get_into_vec(
        &fixture.connection,
        hash,
        NO_LIMIT,
        PROGRESS_TIMEOUT,
        &mut buffer,
    )
    .await
    .unwrap();
    assert!(buffer == bytes, "the blob was reassembled");
    // The missing data and the CV blocks of the two segments it touches, nothing more.
    let cv_blocks = 2 * 1024 * 32;
    assert!(
        fetched <= (size - held + cv_blocks) as u64,
        "fetched {fetched}"
    );
}

#[tokio::test]
async fn large_memory_get_fills_a_mapped_buffer_and_reuses_it() {
    let fixture = Fixture::start(StoreLimits::default()).await;
    let size = MAPPED_MIN + 3 * SEGMENT_LEN as usize + 777;
    let bytes = sample(size, 11);
    let hash = fixture.storage.store.insert(&bytes).unwrap();
    let mut buffer = BlobBuffer::new();
    blob::get_into_buffer(
        &fixture.connection,
        hash,
        NO_LIMIT,
        PROGRESS_TIMEOUT,
        &mut buffer,
    )
    .await
    .unwrap();
    assert!(buffer.is_mapped(), "{buffer:?}");
    assert!(buffer[..] == bytes[..], "the blob arrived");
    // A cleared buffer is filled again in place.
    let memory = buffer.as_ptr();
    buffer.clear();
    blob::get_into_buffer(
        &fixture.connection,
        hash,
        NO_LIMIT,
        PROGRESS_TIMEOUT,
        &mut buffer,
    )
    .await
    .unwrap();
    assert_eq!(buffer.as_ptr(), memory);
    assert!(buffer[..] == bytes[..], "the blob arrived again");
    // The retrying front end hands the same bytes over without a copy.
    let fetched = fixture.get_memory(hash, NO_LIMIT).await.unwrap();
    assert!(fetched == bytes);

    // A small blob stays on the heap.
    let small = sample(3 * CHUNK_GROUP_LEN as usize + 5, 12);
    let small_hash = fixture.storage.store.insert(&small).unwrap();
    let mut buffer = BlobBuffer::new();
    blob::get_into_buffer(
        &fixture.connection,
        small_hash,
        NO_LIMIT,
        PROGRESS_TIMEOUT,
        &mut buffer,
    )
    .await
    .unwrap();
    assert!(!buffer.is_mapped());
    assert!(buffer[..] == small[..]);
}

#[tokio::test]
async fn corrupt_memory_get_exposes_only_the_groups_verified_before_it() {
    let fixture = Fixture::start(StoreLimits::default()).await;
    let size = MAPPED_MIN + SEGMENT_LEN as usize;
    let bytes = sample(size, 13);
    let hash = fixture.storage.store.insert(&bytes).unwrap();
    let flipped = MAPPED_MIN as u64 / 2 + 12_345;
    fixture.corrupt(&hash, flipped);
    let group_start = flipped / CHUNK_GROUP_LEN * CHUNK_GROUP_LEN;

    let mut buffer = BlobBuffer::new();
    let error = blob::get_into_buffer(
        &fixture.connection,
        hash,
        NO_LIMIT,
        PROGRESS_TIMEOUT,
        &mut buffer,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, TransferError::Blob(BlobError::Integrity { offset }) if offset == group_start),
        "{error:?}"
    );
    // Everything before the bad group, verified; nothing from it on.
    assert_eq!(buffer.len() as u64, group_start);
    assert!(buffer[..] == bytes[..group_start as usize]);

    // A Vec destination behaves the same.
    let mut vec = Vec::new();
    let error = blob::get_into_vec(
        &fixture.connection,
        hash,
        NO_LIMIT,
        PROGRESS_TIMEOUT,
        &mut vec,
    )
    .await
    .unwrap_err();
    assert!(error.is_integrity(), "{error:?}");
    assert_eq!(vec.len() as u64, group_start);
}

#[tokio::test]
async fn interrupted_upload_resumes_from_the_partial() {
    let fixture = Fixture::start(StoreLimits::default()).await;
    let storage = &fixture.storage;
    let size = SEGMENT_LEN as usize + 5 * CHUNK_GROUP_LEN as usize + 3;
    let bytes = sample(size, 5);
    let hash = BlobHash::of(&bytes);

    let connection = fixture.connection.clone();
    let mut upload = start_put(&connection, size as u64, Some(hash), true)
        .await
        .unwrap();
    assert_eq!(upload.offset(), 0);
    upload
        .write(Bytes::copy_from_slice(&bytes[..size / 2]))
        .await
        .unwrap();
    // Let the bytes reach the store before cutting (polled, not slept: CI machines are busy).
    let observer = fixture.connect().await;
    for _ in 0..200 {
        if let BlobStatus::Partial { received: r, .. } = stat(&observer, hash).await.unwrap()
            && r > 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    connection.close(0u32.into(), b"cut");

    let connection = fixture.connect().await;
    let mut received = 0;
    for _ in 0..200 {
        if let BlobStatus::Partial {
            received: r,
            size: s,
        } = stat(&connection, hash).await.unwrap()
        {
            assert_eq!(s, size as u64);
            received = r;
            if r > 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(received > 0, "the store kept the partial upload");

    let work = tempfile::tempdir().unwrap();
    let source = write_file(work.path(), "in", &bytes);
    let mut upload = None;
    for _ in 0..200 {
        match start_put(&connection, size as u64, Some(hash), true).await {
            Ok(started) => {
                upload = Some(started);
                break;
            }
            // The first attempt's handler may still hold the upload for a moment.
            Err(BlobError::Refused {
                kind: BlobErrorKind::Busy,
                ..
            }) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) => panic!("{error:?}"),
        }
    }
    let upload = upload.expect("the store released the interrupted upload");
    let resumed = upload.offset();
    // The store kept a verified prefix of what was sent before the cut, and no more than that.
    assert!(
        resumed > 0 && resumed <= (size / 2) as u64,
        "resumed from {resumed}; {received} seen after the cut; {} sent",
        size / 2
    );
    drop(upload);
    // Dropping the first attempt's stream releases the upload; retry until the store agrees.
    let mut stored = None;
    for _ in 0..200 {
        match put_file_once(
            &connection,
            &source,
            hash,
            size as u64,
            &mut NoProgress,
            horde_transport::blob::PROGRESS_TIMEOUT,
        )
        .await
        {
            Ok(hash) => {
                stored = Some(hash);
                break;
            }
            Err(TransferError::Blob(BlobError::Refused {
                kind: BlobErrorKind::Busy,
                ..
            })) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) => panic!("{error:?}"),
        }
    }
    assert_eq!(stored, Some(hash));
    assert_eq!(
        std::fs::read(storage.store.blob_path(&hash)).unwrap(),
        bytes
    );
    assert!(
        !storage
            .dir
            .path()
            .join("partial")
            .join(hash.to_string())
            .exists()
    );
}

#[tokio::test]
async fn limits_are_enforced_with_typed_errors() {
    let fixture = Fixture::start(StoreLimits {
        max_blob_size: 1 << 20,
        put_allowlist: None,
        ..StoreLimits::default()
    })
    .await;
    let connection = &fixture.connection;

    // Over the store's size limit: refused before any byte is sent.
    let error = start_put(connection, (1 << 20) + 1, None, false)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            BlobError::Refused {
                kind: BlobErrorKind::TooLarge,
                ..
            }
        ),
        "{error:?}"
    );
    // At the limit: accepted.
    let bytes = sample(1 << 20, 6);
    let hash = put_bytes(connection, Bytes::from(bytes.clone()))
        .await
        .unwrap();

    // Over the client's size limit on get.
    let error = fixture.get_memory(hash, 1000).await.unwrap_err();
    assert!(
        matches!(error, TransferError::Blob(BlobError::TooLarge { size, max: 1000 }) if size == 1 << 20),
        "{error:?}"
    );

    // A request frame over the cap: refused from its header, with a typed answer.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut frame = (MAX_REQUEST_LEN + 1).to_be_bytes().to_vec();
    frame.extend(vec![0u8; 64]);
    send.write_all(&frame).await.unwrap();
    let response: BlobResponse = FrameReader::new(1 << 20)
        .read(&mut recv)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(response, BlobResponse::Error { kind: BlobErrorKind::BadRequest, ref message } if message.contains("exceeds the cap")),
        "{response:?}"
    );

    // Garbage request: a typed answer, and the node keeps serving.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
    let response: BlobResponse = FrameReader::new(1 << 20)
        .read(&mut recv)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        response,
        BlobResponse::Error {
            kind: BlobErrorKind::BadRequest,
            ..
        }
    ));
    assert_eq!(
        stat(connection, hash).await.unwrap(),
        BlobStatus::Complete { size: 1 << 20 }
    );

    // A put declaring the wrong hash is refused and nothing is stored under either hash.
    let wrong = BlobHash([9; 32]);
    let mut upload = start_put(connection, 10, Some(wrong), false).await.unwrap();
    upload
        .write(Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    let error = upload.finish().await.unwrap_err();
    assert!(
        matches!(
            error,
            BlobError::Refused {
                kind: BlobErrorKind::HashMismatch,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(stat(connection, wrong).await.unwrap(), BlobStatus::Absent);
}

#[tokio::test]
async fn put_allowlist_refuses_other_keys() {
    let allowed = seeded_key(30).hotkey();
    let fixture = Fixture::start(StoreLimits {
        max_blob_size: 1 << 20,
        put_allowlist: Some(vec![allowed]),
        ..StoreLimits::default()
    })
    .await;
    let error = put_bytes(&fixture.connection, Bytes::from_static(b"hello"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            BlobError::Refused {
                kind: BlobErrorKind::NotAllowed,
                ..
            }
        ),
        "{error:?}"
    );
    let allowed_client = localhost_endpoint(&seeded_key(30));
    let connection = blob::connect(&allowed_client, &fixture.storage.addr)
        .await
        .unwrap();
    let hash = put_bytes(&connection, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(hash, BlobHash::of(b"hello"));
}

#[tokio::test]
async fn ranged_get_yields_verified_runs_and_stops_at_a_corrupt_group() {
    let fixture = Fixture::start(StoreLimits::default()).await;
    let size = 2 * SEGMENT_LEN as usize + 777;
    let bytes = sample(size, 9);
    let hash = fixture.storage.store.insert(&bytes).unwrap();
    let connection = &fixture.connection;
    let g = CHUNK_GROUP_LEN;
    // Two ranges in different segments, widened to chunk groups.
    let ranges = vec![
        ByteRange {
            start: g + 5,
            end: 3 * g,
        },
        ByteRange {
            start: SEGMENT_LEN + 10 * g,
            end: u64::MAX,
        },
    ];
    let mut stream = request_get(connection, hash, ranges.clone(), NO_LIMIT, PROGRESS_TIMEOUT)
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(data) = stream.next().await.unwrap() {
        let start = data.offset as usize;
        assert_eq!(&data.bytes[..], &bytes[start..start + data.bytes.len()]);
        got.push((data.offset, data.bytes.len() as u64));
    }
    let delivered: u64 = got.iter().map(|(_, len)| len).sum();
    assert_eq!(delivered, 2 * g + (size as u64 - (SEGMENT_LEN + 10 * g)));
    assert_eq!(got.first().map(|(offset, _)| *offset), Some(g));

    // Corrupt a group of the second range: the groups before it arrive, then the error.
    let flipped = SEGMENT_LEN + 20 * g + 3;
    fixture.corrupt(&hash, flipped);
    let mut stream = request_get(connection, hash, ranges, NO_LIMIT, PROGRESS_TIMEOUT)
        .await
        .unwrap();
    let mut end = 0;
    let error = loop {
        match stream.next().await {
            Ok(Some(data)) => {
                let start = data.offset as usize;
                assert_eq!(&data.bytes[..], &bytes[start..start + data.bytes.len()]);
                end = data.offset + data.bytes.len() as u64;
            }
            Ok(None) => panic!("a corrupt blob was delivered whole"),
            Err(error) => break error,
        }
    };
    let group_start = flipped / g * g;
    assert!(
        matches!(error, BlobError::Integrity { offset } if offset == group_start),
        "{error:?}"
    );
    assert_eq!(
        end, group_start,
        "every group before the bad one was delivered"
    );
}

/// A storage node whose streams give up after `progress_timeout`.
fn storage_with_deadline(progress_timeout: Duration, max_transfers: usize) -> Storage {
    start_storage(StoreLimits {
        progress_timeout,
        max_transfers,
        ..StoreLimits::default()
    })
}

/// Opens a get stream for `hash` and never reads it.
async fn stalled_get(connection: &quinn::Connection, hash: BlobHash) -> quinn::RecvStream {
    let (mut send, recv) = connection.open_bi().await.unwrap();
    let request = BlobRequest::Get {
        hash,
        ranges: Vec::new(),
    };
    send.write_all(&encode_frame(&request, MAX_REQUEST_LEN).unwrap())
        .await
        .unwrap();
    send.finish().unwrap();
    recv
}

/// Checks that `error` is the store's transient `Busy` refusal.
fn assert_busy(error: &BlobError) {
    assert!(
        matches!(
            error,
            BlobError::Refused {
                kind: BlobErrorKind::Busy,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.is_transient(), "busy is worth a retry");
}

/// Repeats `attempt` (`what`) every 20 ms until the store refuses it, and checks the refusal is
/// `Busy`. Polled: the server takes its transfer slots when it reads the requests.
async fn refused_busy<T, F>(mut attempt: impl FnMut() -> F, what: &str)
where
    F: std::future::Future<Output = Result<T, BlobError>>,
{
    for _ in 0..100 {
        match attempt().await {
            Err(error) => return assert_busy(&error),
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("{what} is never refused");
}

/// Fetches `hash` whole on a fresh stream and drops what arrives.
async fn fetch(connection: &quinn::Connection, hash: BlobHash) -> Result<(), BlobError> {
    let mut stream = request_get(connection, hash, Vec::new(), NO_LIMIT, PROGRESS_TIMEOUT).await?;
    while stream.next().await?.is_some() {}
    Ok(())
}

/// Many get streams whose reader never reads must not hold the store's blocking threads: with
/// a pool of two, a fresh get and put still complete at once, long before the stalled streams'
/// deadline, and after it every stalled stream is reset with `TIMED_OUT`.
#[test]
fn unread_get_streams_do_not_block_other_transfers_and_are_reset_after_the_deadline() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let deadline = Duration::from_secs(3);
        let storage = storage_with_deadline(deadline, 64);
        // Larger than a stream's receive window plus the read-ahead, so each stalled sender
        // blocks with data still to read.
        let big = sample(3 * SEGMENT_LEN as usize / 2, 40);
        let big_hash = storage.store.insert(&big).unwrap();
        let client = client();
        let connection = blob::connect(&client, &storage.addr).await.unwrap();
        let mut stalled = Vec::new();
        for _ in 0..8 {
            stalled.push(stalled_get(&connection, big_hash).await);
        }
        // Let the stalled senders fill every window and block.
        tokio::time::sleep(Duration::from_millis(300)).await;

        // On another connection: the stalled streams hold all of this one's flow-control credit.
        let started = std::time::Instant::now();
        let fresh = async {
            let other = blob::connect(&client, &storage.addr).await.unwrap();
            let small = Bytes::from(sample(100_000, 41));
            let hash = put_bytes(&other, small.clone()).await.unwrap();
            let mut got = Vec::new();
            blob::get_into_vec(&other, hash, NO_LIMIT, PROGRESS_TIMEOUT, &mut got)
                .await
                .unwrap();
            assert_eq!(got, small);
        };
        tokio::time::timeout(deadline - Duration::from_millis(500), fresh)
            .await
            .expect("a fresh put and get complete while the stalled streams hold on");
        assert!(started.elapsed() < deadline);

        // Watched without reading, which would let them make progress.
        let resets = async {
            for recv in &mut stalled {
                assert_eq!(recv.received_reset().await.unwrap(), Some(codes::TIMED_OUT));
            }
        };
        tokio::time::timeout(4 * deadline, resets)
            .await
            .expect("the stalled streams are reset after the deadline");
    });
}

/// At most `max_transfers` gets and puts run at once; one more is refused as busy (a stat is
/// still answered), and a slot held by a stalled stream is freed by its deadline.
#[tokio::test]
async fn transfers_beyond_the_cap_are_refused_busy_until_a_slot_frees() {
    // Long enough that the busy refusal is seen before the stalled gets time out, even on a
    // loaded machine (a put that slips in first includes an fsync).
    let deadline = Duration::from_secs(2);
    let storage = storage_with_deadline(deadline, 2);
    let big = sample(3 * SEGMENT_LEN as usize / 2, 42);
    let hash = storage.store.insert(&big).unwrap();
    let client = client();
    let connection = blob::connect(&client, &storage.addr).await.unwrap();
    let _first = stalled_get(&connection, hash).await;
    let _second = stalled_get(&connection, hash).await;
    // Both slots taken (polled: the server takes them when it reads the requests).
    let one_too_many = || put_bytes(&connection, Bytes::from_static(b"one too many"));
    refused_busy(one_too_many, "a third transfer").await;
    assert_eq!(
        stat(&connection, hash).await.unwrap(),
        BlobStatus::Complete {
            size: big.len() as u64
        }
    );
    // The stalled gets are reset at their deadline and free their slots: the retrying client
    // gets through.
    let started = std::time::Instant::now();
    let policy = TransferPolicy {
        max_attempts: 10,
        ..TransferPolicy::default()
    };
    let bytes = get_to_memory(
        &client,
        &storage.addr,
        hash,
        NO_LIMIT,
        &policy,
        &mut NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(bytes, big);
    assert!(started.elapsed() < 10 * deadline);
}

/// One key gets at most `max_transfers_per_peer` of the slots: holding its whole share with
/// gets it never reads, its next get is refused busy (on another connection too: the share is
/// the key's), while a second key still gets and puts at once, far from the total cap.
#[tokio::test]
async fn one_key_holding_its_share_is_refused_busy_while_another_key_is_served() {
    // The stalled gets hold their slots until this deadline: far beyond the test's steps.
    let deadline = Duration::from_secs(20);
    let storage = start_storage(StoreLimits {
        progress_timeout: deadline,
        max_transfers: 8,
        max_transfers_per_peer: Some(2),
        ..StoreLimits::default()
    });
    let big = sample(3 * SEGMENT_LEN as usize / 2, 43);
    let big_hash = storage.store.insert(&big).unwrap();
    let small = sample(10_000, 44);
    let small_hash = storage.store.insert(&small).unwrap();

    let greedy = client();
    let connection = blob::connect(&greedy, &storage.addr).await.unwrap();
    let _first = stalled_get(&connection, big_hash).await;
    let _second = stalled_get(&connection, big_hash).await;
    let another_connection = blob::connect(&greedy, &storage.addr).await.unwrap();
    let third_get = || fetch(&another_connection, small_hash);
    refused_busy(third_get, "a third get from one key").await;

    let started = std::time::Instant::now();
    let other = localhost_endpoint(&seeded_key(5));
    let served = async {
        let connection = blob::connect(&other, &storage.addr).await.unwrap();
        let bytes = Bytes::from(sample(100_000, 45));
        let policy = TransferPolicy::default();
        let mut quiet = NoProgress;
        let (put, got) = tokio::join!(
            put_bytes(&connection, bytes.clone()),
            get_to_memory(
                &other,
                &storage.addr,
                small_hash,
                NO_LIMIT,
                &policy,
                &mut quiet
            )
        );
        assert_eq!(put.unwrap(), BlobHash::of(&bytes));
        assert_eq!(got.unwrap(), small);
    };
    tokio::time::timeout(deadline / 4, served)
        .await
        .expect("another key's put and get are served while the first holds its share");
    assert!(started.elapsed() < deadline);
    // The first key is still held to its share.
    assert_busy(&third_get().await.unwrap_err());
}

/// A peer that sends one byte of a request, or part of an upload, then nothing, has the stream
/// reset and stopped with `TIMED_OUT` after the deadline; the upload's verified part is kept.
#[tokio::test]
async fn a_stalled_request_or_upload_is_stopped_after_the_deadline() {
    let deadline = Duration::from_millis(500);
    let storage = storage_with_deadline(deadline, 64);
    let client = client();
    let connection = blob::connect(&client, &storage.addr).await.unwrap();
    let bound = 10 * deadline;

    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&[0]).await.unwrap();
    let reset = tokio::time::timeout(bound, recv.received_reset())
        .await
        .expect("a stalled request is reset");
    assert_eq!(reset.unwrap(), Some(codes::TIMED_OUT));
    let stopped = tokio::time::timeout(bound, send.stopped()).await.unwrap();
    assert_eq!(stopped.unwrap(), Some(codes::TIMED_OUT));

    let bytes = sample(4 * CHUNK_GROUP_LEN as usize, 43);
    let hash = BlobHash::of(&bytes);
    let mut upload = start_put(&connection, bytes.len() as u64, Some(hash), true)
        .await
        .unwrap();
    let half = 2 * CHUNK_GROUP_LEN as usize;
    upload
        .write(Bytes::copy_from_slice(&bytes[..half]))
        .await
        .unwrap();
    tokio::time::sleep(deadline + Duration::from_millis(300)).await;
    let error = tokio::time::timeout(bound, async {
        loop {
            // The first writes may still land in the send buffer before the stop arrives.
            if let Err(error) = upload.write(Bytes::from_static(&[0; 16])).await {
                return error;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stalled upload is stopped");
    assert!(
        matches!(error, BlobError::Write(quinn::WriteError::Stopped(code)) if code == codes::TIMED_OUT),
        "{error:?}"
    );
    assert_eq!(
        stat(&connection, hash).await.unwrap(),
        BlobStatus::Partial {
            received: half as u64,
            size: bytes.len() as u64
        },
        "the verified part of the stalled upload is kept for a resume"
    );
}

/// A storage node that answers every get with a valid header, the CVs and one and a half chunk
/// groups from where the request starts, then sends nothing more (keeping the stream and the
/// connection open). Records the start of every request.
fn start_stalling_server(bytes: Vec<u8>) -> (NodeAddr, Arc<std::sync::Mutex<Vec<u64>>>) {
    let endpoint = localhost_endpoint(&seeded_key(21));
    let addr = NodeAddr {
        hotkey: endpoint.hotkey(),
        addrs: vec![endpoint.local_addr().unwrap()],
    };
    let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = Arc::clone(&starts);
    let bytes = Arc::new(bytes);
    tokio::spawn(async move {
        while let Some(Ok(horde_transport::IncomingConnection { connection, .. })) =
            endpoint.accept().await
        {
            let (bytes, starts) = (Arc::clone(&bytes), Arc::clone(&recorded));
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    let Ok(Some(BlobRequest::Get { ranges, .. })) = read_request(&mut recv).await
                    else {
                        continue;
                    };
                    let size = bytes.len() as u64;
                    let normalized = normalize_ranges(&ranges, size).unwrap();
                    let start = normalized.first().map_or(size, |range| range.start);
                    starts.lock().unwrap().push(start);
                    let outboard = Outboard::of(&bytes);
                    let header = BlobResponse::Header {
                        size,
                        segment_cvs: outboard.header_segment_cvs(),
                    };
                    write_response(&mut send, &header).await.unwrap();
                    let stop = start + 3 * CHUNK_GROUP_LEN / 2;
                    let mut wire = Vec::new();
                    for piece in plan(size, &normalized) {
                        match piece {
                            Piece::GroupCvs {
                                first_group, count, ..
                            } => {
                                let (first, count) = (first_group as usize, count as usize);
                                for cv in &outboard.group_cvs[first..first + count] {
                                    wire.extend_from_slice(cv);
                                }
                            }
                            Piece::Data { offset, len } => {
                                let end = (offset + len).min(stop);
                                if offset < end {
                                    wire.extend_from_slice(&bytes[offset as usize..end as usize]);
                                }
                            }
                        }
                    }
                    send.write_all(&wire).await.unwrap();
                    // Silent from here on; the stream stays open.
                    tokio::spawn(async move {
                        std::future::pending::<()>().await;
                        drop((send, recv));
                    });
                }
            });
        }
    });
    (addr, starts)
}

/// A node that sends a valid header and part of the data, then nothing, while keep-alives hold
/// the connection open: the download fails as stalled within the bound its policy sets
/// (retried, resuming after the verified group), leaves nothing at the destination and keeps
/// the verified group recorded for a later resume.
#[tokio::test]
async fn a_download_from_a_node_that_goes_silent_fails_as_stalled_and_keeps_the_verified_part() {
    let bytes = sample(4 * CHUNK_GROUP_LEN as usize, 44);
    let hash = BlobHash::of(&bytes);
    let (storage, starts) = start_stalling_server(bytes);
    let client = client();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("out");
    let policy = TransferPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(100),
        progress_timeout: Duration::from_millis(400),
        ..TransferPolicy::default()
    };
    let mut progress = NoProgress;
    let download = get_to_file(
        &client,
        &storage,
        hash,
        &dest,
        None,
        NO_LIMIT,
        &policy,
        &mut progress,
    );
    // Two stalls of 0.4 s and a 0.1 s backoff, with room for a busy machine.
    expect_stalled(download, &policy, Duration::from_secs(5)).await;
    let group = CHUNK_GROUP_LEN;
    assert_eq!(
        *starts.lock().unwrap(),
        vec![0, group],
        "the retry resumed after the verified group"
    );
    assert!(!dest.exists(), "nothing at the destination");
    let state = std::fs::read_to_string(work.path().join("out.partial.state")).unwrap();
    assert_eq!(state.trim(), format!("{hash} {}", 2 * group));
}

/// A storage node that does not answer at all is reported unreachable once the dial budget is
/// spent, not after every attempt's handshake timeout.
#[tokio::test]
async fn a_dead_storage_node_is_reported_unreachable_within_the_dial_budget() {
    // A bound socket that never answers: the handshake gets no reply.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let storage = NodeAddr {
        hotkey: seeded_key(22).hotkey(),
        addrs: vec![silent.local_addr().unwrap()],
    };
    let client = client();
    let policy = TransferPolicy {
        dial_budget: Duration::from_secs(1),
        ..TransferPolicy::default()
    };
    let started = std::time::Instant::now();
    let mut quiet = NoProgress;
    let download = get_to_memory(
        &client,
        &storage,
        BlobHash([1; 32]),
        NO_LIMIT,
        &policy,
        &mut quiet,
    );
    let error = tokio::time::timeout(Duration::from_secs(8), download)
        .await
        .expect("an unreachable node is reported within the dial budget")
        .unwrap_err();
    assert!(
        matches!(error, TransferError::Unreachable { hotkey, .. } if hotkey == storage.hotkey),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// A `horde node --role storage` child process, killed when dropped.
struct StorageProcess {
    child: std::process::Child,
    addr: NodeAddr,
}

impl Drop for StorageProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a storage node in `dir` whose files cannot grow past `max_file_kib` KiB: its shell
/// ignores SIGXFSZ (inherited across exec) and sets RLIMIT_FSIZE, so a write past the limit
/// fails with EFBIG, as it would on a full disk with ENOSPC.
fn start_storage_process(dir: &Path, max_file_kib: u64) -> StorageProcess {
    use std::io::{BufRead as _, BufReader};
    let horde = env!("CARGO_BIN_EXE_horde");
    let key = SecretKey::from_seed(&[23; 32]);
    let key_file = dir.join("hotkey.json");
    key.write_key_file(&key_file).unwrap();
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        "role = \"storage\"\nlisten = \"127.0.0.1:0\"\n[discovery]\nenabled = false\n",
    )
    .unwrap();
    // `ulimit -f` counts 512-byte blocks in dash and 1 KiB blocks in bash: at most this many KiB.
    let script = format!("trap '' XFSZ; ulimit -f {max_file_kib} && exec \"$0\" \"$@\"");
    let mut child = std::process::Command::new("sh")
        .args(["-c", &script, horde, "node", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, started) = std::sync::mpsc::sync_channel(64);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.try_send(line);
        }
    });
    let mut process = StorageProcess {
        child,
        addr: NodeAddr {
            hotkey: key.hotkey(),
            addrs: Vec::new(),
        },
    };
    let line = loop {
        let line = started
            .recv_timeout(Duration::from_secs(30))
            .expect("the storage node logs its start within 30 s");
        if line.contains("horde node started") {
            break line;
        }
    };
    let listen = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("listen="))
        .expect("listen address in the log");
    process.addr.addrs.push(listen.parse().unwrap());
    process
}

/// A put to a store whose writes fail for want of room is refused with `StorageFull` and the
/// stream stopped with `STORAGE_FULL` (not a protocol violation), and nothing appears under
/// `blobs/`.
#[tokio::test]
async fn a_put_to_a_full_store_is_refused_as_storage_full() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_storage_process(dir.path(), 64);
    let client = client();
    let connection = blob::connect(&client, &node.addr).await.unwrap();

    // Raw, to see the stop code: more than one write batch (1 MiB) of a larger blob, unfinished.
    let size = 2 << 20;
    let request = BlobRequest::Put {
        size,
        hash: None,
        resume: false,
    };
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&encode_frame(&request, MAX_REQUEST_LEN).unwrap())
        .await
        .unwrap();
    let ready: BlobResponse = FrameReader::new(1 << 20)
        .read(&mut recv)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ready, BlobResponse::PutReady { offset: 0 });
    let _ = send.write_all(&sample((1 << 20) + 4096, 45)).await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), send.stopped())
        .await
        .expect("the store stops the upload")
        .unwrap();
    assert_eq!(stopped, Some(codes::STORAGE_FULL));
    let refusal: BlobResponse = FrameReader::new(1 << 20)
        .read(&mut recv)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            refusal,
            BlobResponse::Error {
                kind: BlobErrorKind::StorageFull,
                ..
            }
        ),
        "{refusal:?}"
    );

    // Through the client: a typed refusal, not retried.
    let work = tempfile::tempdir().unwrap();
    let source = write_file(work.path(), "in", &sample(3 << 19, 46));
    let error = put_file(
        &client,
        &node.addr,
        &source,
        &TransferPolicy::default(),
        &mut NoProgress,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            TransferError::Blob(BlobError::Refused {
                kind: BlobErrorKind::StorageFull,
                ..
            })
        ),
        "{error:?}"
    );
    let blobs = dir.path().join("storage-data").join("blobs");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 0, "{blobs:?}");
}

/// A store that answers the put request and then never reads the upload: once flow control is
/// exhausted the client's writes make no progress, and the upload fails `Stalled` within the
/// progress timeout (per attempt) instead of hanging.
#[tokio::test]
async fn an_upload_to_a_node_that_stops_reading_fails_as_stalled() {
    let endpoint = localhost_endpoint(&seeded_key(23));
    let storage = NodeAddr {
        hotkey: endpoint.hotkey(),
        addrs: vec![endpoint.local_addr().unwrap()],
    };
    tokio::spawn(async move {
        while let Some(Ok(horde_transport::IncomingConnection { connection, .. })) =
            endpoint.accept().await
        {
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    let Ok(Some(BlobRequest::Put { .. })) = read_request(&mut recv).await else {
                        continue;
                    };
                    write_response(&mut send, &BlobResponse::PutReady { offset: 0 })
                        .await
                        .unwrap();
                    // Never reads the body; keeps the stream open.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        drop((send, recv));
                    });
                }
            });
        }
    });
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("upload");
    // More than the stream's flow-control window (8 MiB), so the writer must wait for the peer.
    std::fs::write(&source, sample(24 << 20, 45)).unwrap();
    let policy = TransferPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(100),
        progress_timeout: Duration::from_millis(500),
        ..TransferPolicy::default()
    };
    let (client, mut progress) = (client(), NoProgress);
    let upload = put_file(&client, &storage, &source, &policy, &mut progress);
    expect_stalled(upload, &policy, Duration::from_secs(8)).await;
}

/// Runs `transfer` and checks that it fails `Stalled` after `policy`'s progress timeout, within
/// `bound` in all (retries included), rather than hanging.
async fn expect_stalled<T: std::fmt::Debug>(
    transfer: impl std::future::Future<Output = Result<T, TransferError>>,
    policy: &TransferPolicy,
    bound: Duration,
) {
    let started = std::time::Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(20), transfer)
        .await
        .expect("the transfer does not hang")
        .unwrap_err();
    assert!(
        matches!(error, TransferError::Blob(BlobError::Stalled { idle }) if idle == policy.progress_timeout),
        "{error:?}"
    );
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
}
