//! The storage role's disk space: refusals before a byte is written (`[storage] max_bytes`, the
//! filesystem's free space), partial uploads reclaimed when the disk fills under them and
//! expired when idle, on a real small filesystem (a 50 MiB tmpfs mounted by the test; these
//! tests run as root).

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use horde_node::client::blob::{self, TransferError, TransferPolicy, put_file};
use horde_node::client::progress::NoProgress;
use horde_node::server::storage::{BlobStore, StoreLimits, serve};
use horde_protocol::blob::BlobErrorKind;
use horde_protocol::{BlobHash, NodeAddr, STORAGE_CAPACITY_CLASS};
use horde_transport::HordeEndpoint;
use horde_transport::blob::{BlobError, start_put};
use horde_transport::test_utils::{SmallDisk, localhost_endpoint, seeded_key};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

/// A store served on 127.0.0.1 and a client endpoint.
struct Storage {
    store: Arc<BlobStore>,
    addr: NodeAddr,
    client: HordeEndpoint,
    cancel: CancellationToken,
}

impl Drop for Storage {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn start_storage(data_dir: &Path, limits: StoreLimits) -> Storage {
    let store = Arc::new(BlobStore::open(data_dir, limits).unwrap());
    let endpoint = Arc::new(localhost_endpoint(&seeded_key(20)));
    let addr = NodeAddr {
        hotkey: endpoint.hotkey(),
        addrs: vec![endpoint.local_addr().unwrap()],
    };
    let cancel = CancellationToken::new();
    tokio::spawn(serve(endpoint, Arc::clone(&store), cancel.clone()));
    Storage {
        store,
        addr,
        client: localhost_endpoint(&seeded_key(1)),
        cancel,
    }
}

fn sample(len: u64, seed: u8) -> Vec<u8> {
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

/// Files in `dir`.
fn files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Waits (up to 10 s) until `dir` holds no file.
async fn until_empty(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !files(dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{dir:?} still holds {:?}",
            files(dir)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_storage_full(error: &BlobError) {
    assert!(
        matches!(
            error,
            BlobError::Refused {
                kind: BlobErrorKind::StorageFull,
                ..
            }
        ),
        "{error:?}"
    );
}

fn assert_put_storage_full(error: &TransferError) {
    match error {
        TransferError::Blob(error) => assert_storage_full(error),
        other => panic!("{other:?}"),
    }
}

/// A put of 100 MB to a 50 MiB filesystem is refused `StorageFull` at once and writes nothing;
/// an upload that fits when it starts but finds the disk full half-way is refused too and its
/// partial reclaimed; the disk is back to what it was and a later 2 MB put succeeds.
#[tokio::test]
async fn a_full_disk_refuses_puts_and_reclaims_their_partials() {
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallDisk::mount_over(&dir.path().join("fs"), 50 * MIB)
        .expect("mounting a tmpfs needs root (these tests run as root)");
    let data = fs.path().join("storage-data");
    let storage = start_storage(&data, StoreLimits::default());
    let partial = data.join("partial");
    let work = tempfile::tempdir().unwrap();
    let policy = TransferPolicy::default();

    // 100 MB declared: refused before a byte is written.
    let big = work.path().join("big");
    std::fs::write(&big, sample(100_000_000, 1)).unwrap();
    let started = Instant::now();
    let error = put_file(
        &storage.client,
        &storage.addr,
        &big,
        &policy,
        &mut NoProgress,
    )
    .await
    .unwrap_err();
    let refused_after = started.elapsed();
    assert_put_storage_full(&error);
    assert!(files(&partial).is_empty(), "{:?}", files(&partial));
    assert_eq!(storage.store.usage().held, 0);
    assert_eq!(storage.store.usage().reserved, 0);
    println!("100 MB put refused after {refused_after:?}: {error}");

    // 30 MiB that fit at the start; 35 MiB of something else fill the disk under it.
    let connection = blob::connect(&storage.client, &storage.addr).await.unwrap();
    let bytes = sample(30 * MIB, 2);
    let hash = BlobHash::of(&bytes);
    let mut upload = start_put(&connection, 30 * MIB, Some(hash), true)
        .await
        .unwrap();
    upload
        .write(Bytes::copy_from_slice(&bytes[..(8 * MIB) as usize]))
        .await
        .unwrap();
    let filler = fs.path().join("filler");
    std::fs::write(&filler, sample(35 * MIB, 3)).unwrap_or_else(|error| {
        panic!("the filler fits beside 8 MiB of upload: {error}");
    });
    let mut refusal = None;
    for piece in bytes[(8 * MIB) as usize..].chunks(MIB as usize) {
        if let Err(error) = upload.write(Bytes::copy_from_slice(piece)).await {
            refusal = Some(error);
            break;
        }
    }
    let refusal = match refusal {
        Some(error) => error,
        None => upload.finish().await.unwrap_err(),
    };
    assert_storage_full(&refusal);
    until_empty(&partial).await;
    until_empty(&data.join("tmp")).await;
    assert_eq!(storage.store.usage().held, 0);
    assert_eq!(storage.store.usage().reserved, 0);

    // The disk is back: a later 2 MB put succeeds.
    std::fs::remove_file(&filler).unwrap();
    let small = work.path().join("small");
    let small_bytes = sample(2_000_000, 4);
    std::fs::write(&small, &small_bytes).unwrap();
    let stored = put_file(
        &storage.client,
        &storage.addr,
        &small,
        &policy,
        &mut NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(stored, BlobHash::of(&small_bytes));
    assert!(storage.store.usage().held >= 2_000_000);
}

/// `[storage] max_bytes` counts stored blobs and partials: a put past it is refused
/// `StorageFull` before a byte is written (no partial, no temporary file), one under it is
/// served, and the published capacity entry shows the cap and what is held.
#[tokio::test]
async fn a_put_past_max_bytes_is_refused_before_a_byte_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        max_bytes: Some(4 * MIB),
        ..StoreLimits::default()
    };
    let storage = start_storage(dir.path(), limits);
    let capacity = storage.store.capacity_updates();
    let entry = capacity.borrow()[0].clone();
    assert_eq!(entry.class.0, STORAGE_CAPACITY_CLASS);
    assert_eq!((entry.free, entry.total), (4, 4));

    let connection = blob::connect(&storage.client, &storage.addr).await.unwrap();
    let first = sample(3 * MIB, 5);
    let hash = horde_transport::blob::put_bytes(&connection, Bytes::from(first.clone()))
        .await
        .unwrap();
    assert_eq!(hash, BlobHash::of(&first));
    let held = storage.store.usage().held;
    assert!(held > 3 * MIB, "{held}");
    let entry = capacity.borrow()[0].clone();
    // 3 MiB and its outboard held: less than a whole MiB free (free MiB round down).
    assert_eq!((entry.free, entry.total), (0, 4));

    for declared in [Some(BlobHash::of(&sample(2 * MIB, 6))), None] {
        let error = start_put(&connection, 2 * MIB, declared, true)
            .await
            .unwrap_err();
        assert_storage_full(&error);
        assert!(error.to_string().contains("cap"), "{error}");
    }
    assert!(files(&dir.path().join("partial")).is_empty());
    assert!(files(&dir.path().join("tmp")).is_empty());
    assert_eq!(storage.store.usage().held, held);
    assert_eq!(storage.store.usage().reserved, 0);

    let second = sample(MIB / 2, 7);
    horde_transport::blob::put_bytes(&connection, Bytes::from(second))
        .await
        .unwrap();
}

/// A partial upload nobody continues is removed after `[storage] partial_idle_secs` and its
/// bytes no longer count; one being written is not.
#[tokio::test]
async fn an_idle_partial_upload_expires_and_gives_its_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        partial_idle: Duration::from_secs(1),
        ..StoreLimits::default()
    };
    let storage = start_storage(dir.path(), limits);
    let partial = dir.path().join("partial");
    let connection = blob::connect(&storage.client, &storage.addr).await.unwrap();

    let bytes = sample(4 * MIB, 8);
    let hash = BlobHash::of(&bytes);
    let mut upload = start_put(&connection, 4 * MIB, Some(hash), true)
        .await
        .unwrap();
    upload
        .write(Bytes::copy_from_slice(&bytes[..(2 * MIB) as usize]))
        .await
        .unwrap();
    // Held open past the idle time: not expired while its upload runs.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(partial.join(hash.to_string()).exists());
    drop(upload);
    until_empty(&partial).await;
    // The expiry removes the files, then forgets their bytes: a moment apart.
    let deadline = Instant::now() + Duration::from_secs(5);
    while storage.store.usage().held != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(storage.store.usage().held, 0);
    assert_eq!(storage.store.usage().reserved, 0);
}
