//! The storage role and the blob client over real QUIC connections on 127.0.0.1.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use horde_node::blob_client::{
    self, ClientError, GetOutcome, NoProgress, Progress, get_to_file, get_to_file_once,
    get_to_memory, put_file, put_file_once,
};
use horde_node::storage::{BlobStore, StoreLimits, serve};
use horde_protocol::blob::{
    BlobErrorKind, BlobResponse, BlobStatus, ByteRange, CHUNK_GROUP_LEN, MAX_REQUEST_LEN,
    SEGMENT_LEN,
};
use horde_protocol::{BlobHash, NodeAddr};
use horde_transport::blob::{
    BlobBuffer, BlobError, MAPPED_MIN, put_bytes, request_get, start_put, stat,
};
use horde_transport::test_utils::{localhost_endpoint, seeded_key};
use horde_transport::{FrameReader, HordeEndpoint};
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
        let connection = blob_client::connect(&client, &storage.addr).await.unwrap();
        Self {
            storage,
            client,
            connection,
        }
    }

    /// A fresh connection to the storage node.
    async fn connect(&self) -> quinn::Connection {
        blob_client::connect(&self.client, &self.storage.addr)
            .await
            .unwrap()
    }

    /// [`get_to_file`] with retries, no expected size, no limit and no progress.
    async fn get_file(&self, hash: BlobHash, dest: &Path) -> Result<GetOutcome, ClientError> {
        get_to_file(
            &self.client,
            &self.storage.addr,
            hash,
            dest,
            None,
            NO_LIMIT,
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
        let hash = put_file(client, &storage.addr, &source, &mut NoProgress)
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
            &mut NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(outcome.size, len as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), bytes, "len {len}");
        let memory = get_to_memory(client, &storage.addr, hash, NO_LIMIT)
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
        matches!(error, ClientError::Blob(BlobError::NotFound(hash)) if hash == absent),
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
        matches!(error, ClientError::Blob(BlobError::Integrity { offset }) if offset == group_start),
        "{error:?}"
    );
    assert!(error.is_integrity());
    let leftovers: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // In memory too.
    let error = get_to_memory(&fixture.client, &fixture.storage.addr, hash, NO_LIMIT)
        .await
        .unwrap_err();
    assert!(error.is_integrity(), "{error:?}");
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
    let error = get_to_file_once(&connection, hash, &dest, None, NO_LIMIT, &mut cut)
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::Blob(ref e) if e.is_transient()),
        "{error:?}"
    );
    assert!(
        !dest.exists(),
        "no file at the destination before completion"
    );
    let verified_before_cut = cut.done;
    assert!(verified_before_cut >= size as u64 / 2 && verified_before_cut < size as u64);

    let connection = fixture.connect().await;
    let outcome = get_to_file_once(&connection, hash, &dest, None, NO_LIMIT, &mut NoProgress)
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
    let fetched = blob_client::get_into_vec(&fixture.connection, hash, NO_LIMIT, &mut buffer)
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
    blob_client::get_into_buffer(&fixture.connection, hash, NO_LIMIT, &mut buffer)
        .await
        .unwrap();
    assert!(buffer.is_mapped(), "{buffer:?}");
    assert!(buffer[..] == bytes[..], "the blob arrived");
    // A cleared buffer is filled again in place.
    let memory = buffer.as_ptr();
    buffer.clear();
    blob_client::get_into_buffer(&fixture.connection, hash, NO_LIMIT, &mut buffer)
        .await
        .unwrap();
    assert_eq!(buffer.as_ptr(), memory);
    assert!(buffer[..] == bytes[..], "the blob arrived again");
    // The retrying front end hands the same bytes over without a copy.
    let fetched = get_to_memory(&fixture.client, &fixture.storage.addr, hash, NO_LIMIT)
        .await
        .unwrap();
    assert!(fetched == bytes);

    // A small blob stays on the heap.
    let small = sample(3 * CHUNK_GROUP_LEN as usize + 5, 12);
    let small_hash = fixture.storage.store.insert(&small).unwrap();
    let mut buffer = BlobBuffer::new();
    blob_client::get_into_buffer(&fixture.connection, small_hash, NO_LIMIT, &mut buffer)
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
    let error = blob_client::get_into_buffer(&fixture.connection, hash, NO_LIMIT, &mut buffer)
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::Blob(BlobError::Integrity { offset }) if offset == group_start),
        "{error:?}"
    );
    // Everything before the bad group, verified; nothing from it on.
    assert_eq!(buffer.len() as u64, group_start);
    assert!(buffer[..] == bytes[..group_start as usize]);

    // A Vec destination behaves the same.
    let mut vec = Vec::new();
    let error = blob_client::get_into_vec(&fixture.connection, hash, NO_LIMIT, &mut vec)
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
        match put_file_once(&connection, &source, hash, size as u64, &mut NoProgress).await {
            Ok(hash) => {
                stored = Some(hash);
                break;
            }
            Err(ClientError::Blob(BlobError::Refused {
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
    let error = get_to_memory(&fixture.client, &fixture.storage.addr, hash, 1000)
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::Blob(BlobError::TooLarge { size, max: 1000 }) if size == 1 << 20),
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
    let connection = blob_client::connect(&allowed_client, &fixture.storage.addr)
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
    let mut stream = request_get(connection, hash, ranges.clone(), NO_LIMIT)
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
    let mut stream = request_get(connection, hash, ranges, NO_LIMIT)
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
