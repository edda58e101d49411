//! Volume materialization and uploads against real servers on 127.0.0.1: a Python HTTP server
//! process (`tests/fixtures/http_server.py`) and a horde storage node.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use horde_node::server::executor::volumes::{
    HttpClient, OutputBudget, PathError, VolumeError, materialize, unchanged_since, upload,
};
use horde_node::server::storage::{BlobStore, StoreLimits, serve};
use horde_protocol::messages::OutputLocation;
use horde_protocol::{
    BlobHash, NodeAddr, RelativePath, UploadSpec, UploadTarget, VolumeSource, VolumeSpec,
};
use horde_transport::test_utils::{localhost_endpoint, seeded_key};
use tokio_util::sync::CancellationToken;

/// The HTTP server process; killed on drop.
struct HttpServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl HttpServer {
    fn start(drop_after: Option<usize>) -> Self {
        Self::start_with(drop_after, &[])
    }

    /// With the fixture's fault flags (`--corrupt-dropped`, `--no-ranges`).
    fn start_with(drop_after: Option<usize>, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/http_server.py");
        let mut command = Command::new("python3");
        command
            .arg(script)
            .arg("--dir")
            .arg(dir.path())
            .args(flags)
            .stdout(Stdio::piped());
        if let Some(k) = drop_after {
            command.arg("--drop-after").arg(k.to_string());
        }
        let mut child = command.spawn().expect("python3 is installed");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the server prints its port");
        Self { child, port, dir }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    fn serve_file(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.path().join(name), bytes).unwrap();
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sample(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 997) as u8).collect()
}

fn http() -> HttpClient {
    HttpClient::new(4, Duration::from_millis(50))
}

fn volume(path: &str, source: VolumeSource) -> VolumeSpec {
    VolumeSpec {
        path: RelativePath(path.to_owned()),
        source,
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files_under(&path));
            } else {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test]
async fn url_source_resumes_with_range_after_a_dropped_connection() {
    let server = HttpServer::start(Some(100_000));
    let bytes = sample(1_000_000);
    server.serve_file("data.bin", &bytes);
    let job = tempfile::tempdir().unwrap();
    let endpoint = localhost_endpoint(&seeded_key(1));
    let placed = materialize(
        job.path(),
        &[volume(
            "inputs/data.bin",
            VolumeSource::Url {
                url: server.url("data.bin"),
                size: Some(bytes.len() as u64),
                blake3: Some(BlobHash::of(&bytes)),
            },
        )],
        &endpoint,
        &http(),
    )
    .await
    .unwrap();
    assert_eq!(placed[0].path, job.path().join("volume/inputs/data.bin"));
    assert_eq!(std::fs::read(&placed[0].path).unwrap(), bytes);

    let gets: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r["method"] == "GET")
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets[0]["headers"].get("range").is_none());
    let range = gets[1]["headers"]["range"].as_str().unwrap();
    let resumed_at: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .unwrap()
        .parse()
        .unwrap();
    assert!(resumed_at > 0 && resumed_at <= 100_000, "{range}");
}

/// The GETs the server saw and the `Range` each asked for.
fn get_ranges(server: &HttpServer) -> Vec<Option<String>> {
    server
        .requests()
        .into_iter()
        .filter(|r| r["method"] == "GET")
        .map(|r| r["headers"]["range"].as_str().map(str::to_owned))
        .collect()
}

fn url_volume(server: &HttpServer, bytes: &[u8]) -> VolumeSpec {
    volume(
        "data.bin",
        VolumeSource::Url {
            url: server.url("data.bin"),
            size: Some(bytes.len() as u64),
            blake3: Some(BlobHash::of(bytes)),
        },
    )
}

#[tokio::test]
async fn a_resumed_download_with_a_corrupted_prefix_is_refused_and_leaves_no_file() {
    let server = HttpServer::start_with(Some(100_000), &["--corrupt-dropped"]);
    let bytes = sample(1_000_000);
    server.serve_file("data.bin", &bytes);
    let job = tempfile::tempdir().unwrap();
    let endpoint = localhost_endpoint(&seeded_key(1));
    let error = materialize(
        job.path(),
        &[url_volume(&server, &bytes)],
        &endpoint,
        &http(),
    )
    .await
    .unwrap_err();
    // The right size, the right tail: only the hash of the whole can tell.
    assert!(
        matches!(error, VolumeError::HashMismatch { expected, actual, .. }
            if expected == BlobHash::of(&bytes) && actual != expected),
        "{error:?}"
    );
    let ranges = get_ranges(&server);
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert!(ranges[0].is_none() && ranges[1].is_some(), "{ranges:?}");
    assert!(
        files_under(job.path()).is_empty(),
        "{:?}",
        files_under(job.path())
    );
}

#[tokio::test]
async fn a_resume_answered_with_the_whole_file_starts_over() {
    let server = HttpServer::start_with(Some(100_000), &["--no-ranges"]);
    let bytes = sample(1_000_000);
    server.serve_file("data.bin", &bytes);
    let job = tempfile::tempdir().unwrap();
    let endpoint = localhost_endpoint(&seeded_key(1));
    let placed = materialize(
        job.path(),
        &[url_volume(&server, &bytes)],
        &endpoint,
        &http(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&placed[0].path).unwrap(), bytes);
    let ranges = get_ranges(&server);
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert!(
        ranges[1].is_some(),
        "the second GET asked to resume: {ranges:?}"
    );
}

#[tokio::test]
async fn wrong_blake3_or_size_is_a_typed_error_and_leaves_no_file() {
    let server = HttpServer::start(None);
    let bytes = sample(50_000);
    server.serve_file("data.bin", &bytes);
    let job = tempfile::tempdir().unwrap();
    let endpoint = localhost_endpoint(&seeded_key(1));

    let wrong = BlobHash([1; 32]);
    let error = materialize(
        job.path(),
        &[volume(
            "data.bin",
            VolumeSource::Url {
                url: server.url("data.bin"),
                size: None,
                blake3: Some(wrong),
            },
        )],
        &endpoint,
        &http(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, VolumeError::HashMismatch { expected, actual, .. }
            if expected == wrong && actual == BlobHash::of(&bytes)),
        "{error:?}"
    );
    assert!(
        files_under(job.path()).is_empty(),
        "{:?}",
        files_under(job.path())
    );

    let error = materialize(
        job.path(),
        &[volume(
            "data.bin",
            VolumeSource::Url {
                url: server.url("data.bin"),
                size: Some(49_999),
                blake3: None,
            },
        )],
        &endpoint,
        &http(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, VolumeError::SizeMismatch { .. }),
        "{error:?}"
    );
    assert!(files_under(job.path()).is_empty());

    let error = materialize(
        job.path(),
        &[volume(
            "missing.bin",
            VolumeSource::Url {
                url: server.url("missing.bin"),
                size: None,
                blake3: None,
            },
        )],
        &endpoint,
        &http(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, VolumeError::HttpStatus { status: 404, .. }),
        "{error:?}"
    );
}

/// What a job may upload in these tests: far above their files.
const OUTPUT_LIMIT: u64 = 1 << 30;

#[tokio::test]
async fn http_put_upload_sends_the_file_with_custom_headers() {
    let server = HttpServer::start(None);
    let job = tempfile::tempdir().unwrap();
    let output = job.path().join("output/results");
    std::fs::create_dir_all(&output).unwrap();
    let bytes = sample(300_000);
    std::fs::write(output.join("model.bin"), &bytes).unwrap();
    let endpoint = localhost_endpoint(&seeded_key(1));
    let url = server.url("uploaded.bin?X-Amz-Signature=abc");
    let refs = upload(
        job.path(),
        &[UploadSpec {
            path: RelativePath("results/model.bin".to_owned()),
            target: UploadTarget::HttpPut {
                url: url.clone(),
                headers: vec![("x-amz-meta-job".to_owned(), "job-42".to_owned())],
            },
        }],
        &endpoint,
        &http(),
        &mut OutputBudget::new(OUTPUT_LIMIT),
    )
    .await
    .unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].size, bytes.len() as u64);
    assert_eq!(refs[0].hash, BlobHash::of(&bytes));
    assert_eq!(refs[0].location, OutputLocation::Url(url));
    assert_eq!(
        std::fs::read(server.dir.path().join("uploaded.bin")).unwrap(),
        bytes
    );
    let puts: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r["method"] == "PUT")
        .collect();
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0]["headers"]["x-amz-meta-job"], "job-42");
    assert_eq!(
        puts[0]["headers"]["content-length"],
        bytes.len().to_string()
    );
    assert!(puts[0]["headers"].get("transfer-encoding").is_none());
}

/// An output sent mid-session is sent again at the job's end only if it changed: the same
/// bytes, or the file removed since, need no second upload; other bytes of the same size, or a
/// FIFO or symlink in its place, do.
#[tokio::test]
async fn an_output_sent_once_is_unchanged_until_its_bytes_change() {
    let server = HttpServer::start(None);
    let job = tempfile::tempdir().unwrap();
    let output = job.path().join("output");
    std::fs::create_dir_all(&output).unwrap();
    let bytes = sample(200_000);
    std::fs::write(output.join("out.bin"), &bytes).unwrap();
    let refs = upload(
        job.path(),
        &[UploadSpec {
            path: RelativePath("out.bin".to_owned()),
            target: UploadTarget::HttpPut {
                url: server.url("out.bin"),
                headers: Vec::new(),
            },
        }],
        &localhost_endpoint(&seeded_key(1)),
        &http(),
        &mut OutputBudget::new(OUTPUT_LIMIT),
    )
    .await
    .unwrap();
    let sent = &refs[0];
    assert!(unchanged_since(job.path(), sent).await);
    let mut changed = bytes.clone();
    changed[100_000] ^= 1;
    std::fs::write(output.join("out.bin"), &changed).unwrap();
    assert!(
        !unchanged_since(job.path(), sent).await,
        "same size, other bytes"
    );
    std::fs::write(output.join("out.bin"), &bytes).unwrap();
    assert!(
        unchanged_since(job.path(), sent).await,
        "the same bytes again"
    );
    std::fs::remove_file(output.join("out.bin")).unwrap();
    assert!(
        unchanged_since(job.path(), sent).await,
        "removed: the copy sent stands"
    );
    rustix::fs::mknodat(
        rustix::fs::CWD,
        output.join("out.bin"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    assert!(
        !unchanged_since(job.path(), sent).await,
        "a FIFO in its place"
    );
    std::fs::remove_file(output.join("out.bin")).unwrap();
    std::fs::write(job.path().join("elsewhere"), &bytes).unwrap();
    std::os::unix::fs::symlink(job.path().join("elsewhere"), output.join("out.bin")).unwrap();
    assert!(
        !unchanged_since(job.path(), sent).await,
        "a symlink in its place"
    );
}

#[tokio::test]
async fn blob_and_inline_volumes_and_blob_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), StoreLimits::default()).unwrap());
    let storage_endpoint = Arc::new(localhost_endpoint(&seeded_key(20)));
    let storage = NodeAddr {
        hotkey: storage_endpoint.hotkey(),
        addrs: vec![storage_endpoint.local_addr().unwrap()],
    };
    let cancel = CancellationToken::new();
    tokio::spawn(serve(storage_endpoint, Arc::clone(&store), cancel.clone()));

    let bytes = sample(200_000);
    let hash = store.insert(&bytes).unwrap();
    let job = tempfile::tempdir().unwrap();
    let endpoint = localhost_endpoint(&seeded_key(1));
    materialize(
        job.path(),
        &[
            volume(
                "a/blob.bin",
                VolumeSource::Blob {
                    hash,
                    size: bytes.len() as u64,
                    storage: storage.clone(),
                },
            ),
            volume(
                "a/inline.txt",
                VolumeSource::Inline {
                    bytes: b"hello".to_vec(),
                },
            ),
        ],
        &endpoint,
        &http(),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(job.path().join("volume/a/blob.bin")).unwrap(),
        bytes
    );
    assert_eq!(
        std::fs::read(job.path().join("volume/a/inline.txt")).unwrap(),
        b"hello"
    );

    // A wrong declared size is refused before any data is kept.
    let error = materialize(
        job.path(),
        &[volume(
            "b.bin",
            VolumeSource::Blob {
                hash,
                size: 5,
                storage: storage.clone(),
            },
        )],
        &endpoint,
        &http(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, VolumeError::Blob { .. }), "{error:?}");
    assert!(!job.path().join("volume/b.bin").exists());

    // Paths are validated before anything is fetched.
    let error = materialize(
        job.path(),
        &[volume("../escape", VolumeSource::Inline { bytes: vec![1] })],
        &endpoint,
        &http(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            VolumeError::Path {
                source: PathError::ParentDir,
                ..
            }
        ),
        "{error:?}"
    );

    // Outputs go to the store; the reference carries size and hash.
    std::fs::create_dir_all(job.path().join("output")).unwrap();
    std::fs::write(job.path().join("output/out.bin"), &bytes[..1000]).unwrap();
    let refs = upload(
        job.path(),
        &[UploadSpec {
            path: RelativePath("out.bin".to_owned()),
            target: UploadTarget::Blob {
                storage: storage.clone(),
            },
        }],
        &endpoint,
        &http(),
        &mut OutputBudget::new(OUTPUT_LIMIT),
    )
    .await
    .unwrap();
    assert_eq!(refs[0].hash, BlobHash::of(&bytes[..1000]));
    assert_eq!(refs[0].location, OutputLocation::Blob(storage.clone()));
    assert!(store.blob_path(&refs[0].hash).exists());

    // A sparse output of 64 GiB (a few blocks on disk) is refused before a byte is read or
    // sent, as is one that only the sum of one upload's outputs takes past the limit.
    let sparse = std::fs::File::create(job.path().join("output/sparse.bin")).unwrap();
    sparse.set_len(64 << 30).unwrap();
    let started = std::time::Instant::now();
    let to_store = |name: &str| UploadSpec {
        path: RelativePath(name.to_owned()),
        target: UploadTarget::Blob {
            storage: storage.clone(),
        },
    };
    let error = upload(
        job.path(),
        &[to_store("sparse.bin")],
        &endpoint,
        &http(),
        &mut OutputBudget::new(OUTPUT_LIMIT),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, VolumeError::OverBudget { path, size, .. } if path == "sparse.bin"
            && *size == 64 << 30),
        "{error:?}"
    );
    assert!(error.to_string().contains("output_mb"), "{error}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "refused at once"
    );
    std::fs::write(job.path().join("output/out2.bin"), &bytes[..1000]).unwrap();
    let budget = &mut OutputBudget::new(1500);
    let error = upload(
        job.path(),
        &[to_store("out.bin"), to_store("out2.bin")],
        &endpoint,
        &http(),
        budget,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, VolumeError::OverBudget { path, .. } if path == "out2.bin"),
        "{error:?}"
    );
    // The budget is the job's: what one upload sent is gone for the next ones, each of which
    // would fit on its own.
    assert_eq!(budget.left(), 500);
    let error = upload(
        job.path(),
        &[to_store("out2.bin")],
        &endpoint,
        &http(),
        budget,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, VolumeError::OverBudget { path, size: 1000, max: 1500, left: 500 }
            if path == "out2.bin"),
        "{error:?}"
    );

    // An output that is a symlink is refused.
    std::os::unix::fs::symlink("/etc/passwd", job.path().join("output/link")).unwrap();
    let error = upload(
        job.path(),
        &[UploadSpec {
            path: RelativePath("link".to_owned()),
            target: UploadTarget::HttpPut {
                url: "http://127.0.0.1:9/".to_owned(),
                headers: vec![],
            },
        }],
        &endpoint,
        &http(),
        &mut OutputBudget::new(OUTPUT_LIMIT),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            VolumeError::Path {
                source: PathError::Symlink(_),
                ..
            }
        ),
        "{error:?}"
    );
    cancel.cancel();
}
