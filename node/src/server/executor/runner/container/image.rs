//! The image a job runs, by id: a reference found in the engine (pulled when absent, checked
//! against its digest when pinned), or an archive fetched from horde storage and loaded.

use std::path::Path;

use bollard::models::ImageInspect;
use bollard::query_parameters::{CreateImageOptions, ImportImageOptions};
use futures::StreamExt as _;
use horde_protocol::{BlobHash, NodeAddr};
use horde_transport::HordeEndpoint;
use tokio::io::AsyncReadExt as _;

use super::engine::{Engine, engine_error, is_not_found};
use crate::client::blob::{self as blob_client, TransferPolicy};
use crate::client::progress::NoProgress;
use crate::server::executor::runner::RunnerError;

/// The largest image archive an executor fetches: 16 GiB holds a CUDA base image with room
/// to spare, and bounds the disk one job can claim before it starts.
pub const MAX_IMAGE_ARCHIVE: u64 = 16 << 30;

/// Read size when streaming an archive into the engine.
const LOAD_CHUNK: usize = 256 << 10;

/// A reference split at its digest: `name[:tag]` and `sha256:HEX`, if pinned.
fn split_digest(reference: &str) -> Result<(&str, Option<&str>), RunnerError> {
    let Some((name, digest)) = reference.split_once('@') else {
        return Ok((reference, None));
    };
    let valid = digest
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if !valid || name.is_empty() {
        return Err(RunnerError::InvalidReference {
            reference: reference.to_owned(),
            reason: "a pinned reference is NAME@sha256:<64 hex digits>".into(),
        });
    }
    Ok((name, Some(digest)))
}

/// Whether `image` is the one `digest` pins: one of its repo digests (pulled images), or its
/// id (loaded and imported images have no repo digest; the id is the digest of its config).
fn matches_digest(image: &ImageInspect, digest: &str) -> bool {
    image.id.as_deref() == Some(digest)
        || image
            .repo_digests
            .iter()
            .flatten()
            .any(|repo_digest| repo_digest.rsplit_once('@').map(|(_, d)| d) == Some(digest))
}

fn describe(image: &ImageInspect) -> String {
    let id = image.id.as_deref().unwrap_or("no id");
    match image.repo_digests.as_deref() {
        Some(digests) if !digests.is_empty() => format!("{id} ({})", digests.join(", ")),
        _ => id.to_owned(),
    }
}

/// The image under `name`, if the engine has one.
async fn inspect(engine: &Engine, name: &str) -> Result<Option<ImageInspect>, RunnerError> {
    match engine.docker.inspect_image(name).await {
        Ok(image) => Ok(Some(image)),
        Err(error) if is_not_found(&error) => Ok(None),
        // A malformed name is answered 400 (Docker) or 500 (Podman): not an image we have.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 400, ..
        }) => Ok(None),
        Err(error) => Err(engine_error(
            engine,
            &format!("inspecting image {name}"),
            error,
        )),
    }
}

/// The id of the image `reference` names, if present, checked against the digest when pinned.
async fn present(engine: &Engine, reference: &str) -> Result<Option<String>, RunnerError> {
    let (name, digest) = split_digest(reference)?;
    let Some(digest) = digest else {
        return Ok(inspect(engine, reference).await?.and_then(|image| image.id));
    };
    // By repo digest, then by the name without it (an image loaded under a tag), then by id.
    for candidate in [reference, name, digest] {
        if let Some(image) = inspect(engine, candidate).await? {
            if matches_digest(&image, digest) {
                return Ok(image.id);
            }
            if candidate != digest {
                return Err(RunnerError::DigestMismatch {
                    reference: reference.to_owned(),
                    expected: digest.to_owned(),
                    actual: describe(&image),
                });
            }
        }
    }
    Ok(None)
}

/// The id of the image `reference` names: present in the engine, else pulled. A reference
/// pinned `NAME@sha256:…` must match the image's repo digests or id
/// ([`RunnerError::DigestMismatch`]).
pub async fn resolve(engine: &Engine, reference: &str) -> Result<String, RunnerError> {
    if let Some(id) = present(engine, reference).await? {
        return Ok(id);
    }
    let options = CreateImageOptions {
        from_image: Some(reference.to_owned()),
        ..CreateImageOptions::default()
    };
    let mut pull = engine.streams.create_image(Some(options), None, None);
    while let Some(progress) = pull.next().await {
        if let Err(error) = progress {
            return Err(RunnerError::ImageMissing {
                reference: reference.to_owned(),
                reason: error.to_string(),
            });
        }
    }
    present(engine, reference)
        .await?
        .ok_or_else(|| RunnerError::ImageMissing {
            reference: reference.to_owned(),
            reason: "the pull ended without the image".into(),
        })
}

/// Most `VOLUME`s an image may declare: each becomes a tmpfs of the class's `tmp_mb`.
pub const MAX_IMAGE_VOLUMES: usize = 8;

/// What a container of an image runs, from the image's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRun {
    /// The command, as the engine would build it: the image's entrypoint, then the job's
    /// arguments, else the image's command. The runner starts it behind its start gate
    /// ([`super::gate`]), so it must be known here.
    pub command: Vec<String>,
    /// The directories the image declares `VOLUME`s (the engine would give each a volume of
    /// its own, writable, on the host's disk, whatever the read-only root).
    pub volumes: Vec<String>,
}

/// What a container of `image_id` runs for a job with `args` ([`ImageRun`]); an image
/// declaring more than [`MAX_IMAGE_VOLUMES`] volumes is refused.
pub async fn run(
    engine: &Engine,
    image_id: &str,
    args: &[String],
) -> Result<ImageRun, RunnerError> {
    let config = inspect(engine, image_id)
        .await?
        .ok_or_else(|| RunnerError::ImageMissing {
            reference: image_id.to_owned(),
            reason: "gone from the engine before its container was made".into(),
        })?
        .config
        .unwrap_or_default();
    let tail = if args.is_empty() {
        config.cmd.unwrap_or_default()
    } else {
        args.to_vec()
    };
    let command: Vec<String> = config
        .entrypoint
        .unwrap_or_default()
        .into_iter()
        .chain(tail)
        .collect();
    if command.is_empty() {
        return Err(RunnerError::Refused(format!(
            "image {image_id} names no command and the job gives none"
        )));
    }
    let mut volumes: Vec<String> = config.volumes.unwrap_or_default();
    volumes.sort();
    if volumes.len() > MAX_IMAGE_VOLUMES {
        return Err(RunnerError::Refused(format!(
            "image {image_id} declares {} volumes; at most {MAX_IMAGE_VOLUMES} are run",
            volumes.len()
        )));
    }
    Ok(ImageRun { command, volumes })
}

/// The largest `manifest.json` read from an archive: one entry per image, a few hundred bytes
/// each; 1 MiB is thousands of images, far past the one a job may carry.
const MAX_MANIFEST: u64 = 1 << 20;

/// One image of an archive's `manifest.json`, as the engine's `save` writes it.
#[derive(Debug, serde::Deserialize)]
struct ManifestEntry {
    /// `blobs/sha256/HEX` (OCI layout) or `HEX.json` (older engines): the image id's digest.
    #[serde(rename = "Config")]
    config: String,
    /// The names the engine tags when it loads the archive.
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
}

impl ManifestEntry {
    /// The image id (`sha256:HEX`) this entry's config names.
    fn image_id(&self) -> String {
        let file = self.config.rsplit('/').next().unwrap_or_default();
        format!("sha256:{}", file.trim_end_matches(".json"))
    }
}

/// The `(name, image id)` pairs the archive at `archive` would tag when loaded, from its
/// `manifest.json` (read without loading anything; an archive without one is
/// [`RunnerError::NotAnImage`]).
fn archive_tags(archive: &Path) -> Result<Vec<(String, String)>, RunnerError> {
    use std::io::Read as _;
    let not_an_image = |reason: String| RunnerError::NotAnImage(reason);
    let file = std::fs::File::open(archive)?;
    let mut tar = tar::Archive::new(file);
    let entries = tar
        .entries_with_seek()
        .map_err(|error| not_an_image(format!("reading the archive: {error}")))?;
    for entry in entries {
        let entry = entry.map_err(|error| not_an_image(format!("reading the archive: {error}")))?;
        let is_manifest = entry
            .path()
            .is_ok_and(|path| path.as_os_str() == "manifest.json");
        if !is_manifest {
            continue;
        }
        if entry.size() > MAX_MANIFEST {
            return Err(not_an_image(format!(
                "manifest.json is {} bytes, more than {MAX_MANIFEST}",
                entry.size()
            )));
        }
        let mut text = Vec::new();
        entry.take(MAX_MANIFEST).read_to_end(&mut text)?;
        let manifest: Vec<ManifestEntry> = serde_json::from_slice(&text)
            .map_err(|error| not_an_image(format!("manifest.json: {error}")))?;
        return Ok(manifest
            .iter()
            .flat_map(|image| {
                let id = image.image_id();
                image
                    .repo_tags
                    .iter()
                    .flatten()
                    .map(move |tag| (tag.clone(), id.clone()))
            })
            .collect());
    }
    Err(not_an_image("the archive has no manifest.json".into()))
}

/// Refuses an archive that would move a name the engine has to another image
/// ([`RunnerError::Retag`]). A name it tags anew, or to the image it already names, is fine.
async fn check_tags(engine: &Engine, archive: &Path) -> Result<(), RunnerError> {
    let path = archive.to_owned();
    let tags = tokio::task::spawn_blocking(move || archive_tags(&path))
        .await
        .map_err(|error| RunnerError::NotAnImage(format!("reading the archive: {error}")))??;
    for (name, id) in tags {
        if let Some(existing) = inspect(engine, &name).await?.and_then(|image| image.id)
            && existing != id
        {
            return Err(RunnerError::Retag {
                name,
                existing,
                archive: id,
            });
        }
    }
    Ok(())
}

/// Loads the image archive at `archive` (the engine's `save` format, as `docker load` does)
/// and returns the id of the image it held. An archive the engine cannot load is
/// [`RunnerError::NotAnImage`]; one whose `manifest.json` would retag a name the engine has
/// for another image is [`RunnerError::Retag`], checked before the engine sees it.
pub async fn load(engine: &Engine, archive: &Path) -> Result<String, RunnerError> {
    check_tags(engine, archive).await?;
    let file = tokio::fs::File::open(archive).await?;
    let chunks = futures::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buffer = vec![0u8; LOAD_CHUNK];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok(bytes::Bytes::from(buffer)), Some(file)))
            }
            Err(error) => Some((Err(error), None)),
        }
    });
    let options = ImportImageOptions {
        quiet: true,
        ..ImportImageOptions::default()
    };
    let mut answers = engine
        .streams
        .import_image(options, bollard::body_try_stream(chunks), None);
    let mut loaded = Vec::new();
    while let Some(answer) = answers.next().await {
        match answer {
            Ok(info) => {
                let text = info.stream.unwrap_or_default();
                for line in text.lines() {
                    if let Some(id) = line.strip_prefix("Loaded image ID: ") {
                        loaded.push(id.trim().to_owned());
                    } else if let Some(name) = line.strip_prefix("Loaded image: ") {
                        loaded.push(name.trim().to_owned());
                    }
                }
            }
            Err(error @ bollard::errors::Error::DockerResponseServerError { .. })
            | Err(error @ bollard::errors::Error::DockerStreamError { .. }) => {
                return Err(RunnerError::NotAnImage(error.to_string()));
            }
            Err(error) => return Err(engine_error(engine, "loading the image archive", error)),
        }
    }
    // One image per job: an archive of several is refused rather than guessed from.
    let [name] = loaded.as_slice() else {
        return Err(RunnerError::NotAnImage(format!(
            "the archive must hold exactly one image, the engine loaded {}",
            loaded.len()
        )));
    };
    inspect(engine, name)
        .await?
        .and_then(|image| image.id)
        .ok_or_else(|| RunnerError::NotAnImage(format!("loaded {name}, which is not there")))
}

/// Fetches the image archive `hash` from `storage` into `dest` with the verified, resumable
/// blob client. Bytes that do not match the hash are [`RunnerError::Integrity`].
pub async fn fetch(
    endpoint: &HordeEndpoint,
    storage: &NodeAddr,
    hash: BlobHash,
    size: u64,
    dest: &Path,
) -> Result<(), RunnerError> {
    if size > MAX_IMAGE_ARCHIVE {
        return Err(RunnerError::Fetch(format!(
            "the archive is {size} bytes, more than the {MAX_IMAGE_ARCHIVE} allowed"
        )));
    }
    blob_client::get_to_file(
        endpoint,
        storage,
        hash,
        dest,
        Some(size),
        MAX_IMAGE_ARCHIVE,
        &TransferPolicy::default(),
        &mut NoProgress,
    )
    .await
    .map_err(|error| {
        if error.is_integrity() {
            RunnerError::Integrity(error.to_string())
        } else {
            RunnerError::Fetch(error.to_string())
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const DIGEST: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn references_split_at_their_digest() {
        assert_eq!(split_digest("busybox:1").unwrap(), ("busybox:1", None));
        let pinned = format!("busybox:1@{DIGEST}");
        assert_eq!(split_digest(&pinned).unwrap(), ("busybox:1", Some(DIGEST)));
        for bad in ["busybox@sha256:12", "busybox@md5:00", &format!("@{DIGEST}")] {
            assert!(
                matches!(split_digest(bad), Err(RunnerError::InvalidReference { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_digest_matches_a_repo_digest_or_the_id() {
        let by_id = ImageInspect {
            id: Some(DIGEST.into()),
            ..ImageInspect::default()
        };
        assert!(matches_digest(&by_id, DIGEST));
        let pulled = ImageInspect {
            id: Some("sha256:ff".into()),
            repo_digests: Some(vec![format!("docker.io/library/busybox@{DIGEST}")]),
            ..ImageInspect::default()
        };
        assert!(matches_digest(&pulled, DIGEST));
        let other = ImageInspect {
            id: Some("sha256:ff".into()),
            repo_digests: Some(vec!["busybox@sha256:ee".into()]),
            ..ImageInspect::default()
        };
        assert!(!matches_digest(&other, DIGEST));
    }
}
