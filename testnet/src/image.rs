//! Container images of workspace programs, built from local files (no registry is reachable):
//! a rootfs holding the program, the shared libraries `ldd` names and the loader, imported into
//! the engine (Docker Engine or Podman's service, at `DOCKER_HOST` or the standard socket)
//! through its API.
//!
//! The tag is `REPO:` + the first 16 hex digits of the BLAKE3 of those files (paths and bytes):
//! the same program on the same host gives the same tag, and an image already under it is
//! reused without building. Each new build removes the repository's older images beyond the
//! [`KEEP_IMAGES`] newest (never one a container uses), so rebuilds do not fill the disk. The
//! demo (`horde-testnet demo --runtime container`), the tests and flow-latency all take their
//! images from here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};
use bollard::Docker;
use bollard::query_parameters::{
    CreateImageOptions, ListContainersOptions, ListImagesOptions, RemoveImageOptions,
};
use futures::StreamExt as _;
use horde_node::server::executor::runner::container::engine::engine_address;
use horde_node::server::executor::runner::container::spec::{
    JOB_LABEL, OUTPUT_MOUNT, VOLUME_MOUNT,
};
use horde_protocol::JobId;

/// The repository of the demo job's image.
pub const DEMO_JOB_REPO: &str = "horde-demo-job";

/// Images of one repository kept when another is built: a debug and a release build of the
/// same program (tests and benches at once) plus one being replaced.
pub const KEEP_IMAGES: usize = 3;

/// Where a program sits inside its image (its command).
pub fn path_in_image(program: &Path) -> String {
    let name = program
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("/{name}")
}

/// The demo job (`horde-demo-job`) as an image; its reference (`horde-demo-job:HASH`).
pub async fn demo_job_image() -> anyhow::Result<String> {
    program_image(&crate::demo_job_binary()?, DEMO_JOB_REPO).await
}

/// The engine, its API version negotiated; the error says that an engine is needed and where
/// it was looked for.
pub async fn engine() -> anyhow::Result<Docker> {
    let address = engine_address(None)?;
    let unreachable = |error: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "this needs a container engine (Docker Engine, or `podman system service`) at \
             {address} (set DOCKER_HOST): {error}"
        )
    };
    let docker = Docker::connect_with_unix(&address, 120, bollard::API_DEFAULT_VERSION)
        .map_err(|error| unreachable(&error))?;
    docker
        .negotiate_version()
        .await
        .map_err(|error| unreachable(&error))
}

/// `program` (and what it needs to run) as an image in repository `repo`, built and imported
/// unless the engine has it already; its reference `repo:HASH`.
pub async fn program_image(program: &Path, repo: &str) -> anyhow::Result<String> {
    // One build at a time in a process: two imports under one tag would leave the first image
    // untagged.
    static BUILDING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _building = BUILDING.lock().await;
    let files = runtime_files(program)?;
    let reference = format!("{repo}:{}", content_tag(&files)?);
    let docker = engine().await?;
    if docker.inspect_image(&reference).await.is_ok() {
        return Ok(reference);
    }
    let dir = tempfile::Builder::new().prefix("horde-image-").tempdir()?;
    let tar = rootfs_tar(dir.path(), program, &files)?;
    // The tag rides in `repo` (`name:tag`): Docker Engine takes both forms, Podman's
    // compatible service only this one.
    let options = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(reference.clone()),
        changes: vec![format!("CMD [\"{}\"]", path_in_image(program))],
        ..CreateImageOptions::default()
    };
    let mut progress =
        docker.create_image(Some(options), Some(bollard::body_full(tar.into())), None);
    while let Some(step) = progress.next().await {
        step.with_context(|| format!("importing {reference}"))?;
    }
    docker
        .inspect_image(&reference)
        .await
        .with_context(|| format!("{reference} missing after its import"))?;
    remove_older(&docker, repo).await;
    Ok(reference)
}

/// The ids of the containers (running or not) of job `job`, found by their job label.
pub async fn job_containers(job: JobId) -> anyhow::Result<Vec<String>> {
    let label = format!("{JOB_LABEL}={job}");
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([("label".to_owned(), vec![label])])),
        ..ListContainersOptions::default()
    };
    let containers = engine().await?.list_containers(Some(options)).await?;
    Ok(containers.into_iter().filter_map(|c| c.id).collect())
}

/// Removes `repo`'s images beyond the [`KEEP_IMAGES`] newest; an image in use stays (the engine
/// refuses to remove it without force, which is not asked).
async fn remove_older(docker: &Docker, repo: &str) {
    let options = ListImagesOptions {
        filters: Some(HashMap::from([(
            "reference".to_owned(),
            vec![repo.to_owned()],
        )])),
        ..ListImagesOptions::default()
    };
    let Ok(mut images) = docker.list_images(Some(options)).await else {
        return;
    };
    images.sort_by_key(|image| std::cmp::Reverse(image.created));
    for image in images.iter().skip(KEEP_IMAGES) {
        for tag in &image.repo_tags {
            let _ = docker
                .remove_image(tag, None::<RemoveImageOptions>, None)
                .await;
        }
    }
}

/// `program`, then every shared library `ldd` names for it (the loader included), as host
/// paths. A statically linked program is alone.
fn runtime_files(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut files = vec![program.to_path_buf()];
    if !output.status.success() || text.contains("statically linked") {
        return Ok(files);
    }
    for line in text.lines() {
        ensure!(
            !line.contains("not found"),
            "ldd {}: {line}",
            program.display()
        );
        let path = match line.split_once("=>") {
            Some((_, target)) => target.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        // `linux-vdso.so.1` is the kernel's, in no file.
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(path));
        }
    }
    Ok(files)
}

/// The first 16 hex digits of the BLAKE3 of `files`' paths and contents.
fn content_tag(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut hasher = blake3::Hasher::new();
    for file in files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        hasher.update(file.as_os_str().as_encoded_bytes());
        hasher.update(&[0]);
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok(hasher.finalize().to_hex()[..16].to_owned())
}

/// A tar of a rootfs in `dir`: `program` at [`path_in_image`] (without its debug info), the
/// libraries at their host paths, and the directories a job's container mounts over.
fn rootfs_tar(dir: &Path, program: &Path, files: &[PathBuf]) -> anyhow::Result<Vec<u8>> {
    let root = dir.join("rootfs");
    // Mount points of a job's container (its volume, its outputs, the private /tmp) and the
    // engine's own: present in the image, since its root is read-only.
    for mount in [
        VOLUME_MOUNT,
        OUTPUT_MOUNT,
        "/tmp",
        "/proc",
        "/dev",
        "/sys",
        "/etc",
    ] {
        std::fs::create_dir_all(root.join(mount.trim_start_matches('/')))?;
    }
    let inside = root.join(path_in_image(program).trim_start_matches('/'));
    std::fs::copy(program, &inside)?;
    // A debug build's debug info is most of its size (about 280 of 300 MB for the demo job):
    // left out of the image when `strip` is there (binutils), else kept.
    let _ = Command::new("strip")
        .arg("--strip-debug")
        .arg(&inside)
        .status();
    for library in &files[1..] {
        let inside = root.join(library.strip_prefix("/")?);
        if let Some(parent) = inside.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Copies what a symlink points to, under the name the program asks for.
        std::fs::copy(library, &inside)
            .with_context(|| format!("copying {}", library.display()))?;
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-cf",
            "-",
            ".",
        ])
        .output()
        .context("running tar")?;
    if !tar.status.success() {
        bail!("tar: {}", String::from_utf8_lossy(&tar.stderr));
    }
    Ok(tar.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_program_brings_its_libraries_and_loader() {
        let files = runtime_files(Path::new("/bin/sh")).unwrap();
        assert_eq!(files[0], Path::new("/bin/sh"));
        if files.len() > 1 {
            assert!(
                files
                    .iter()
                    .any(|f| f.to_string_lossy().contains("ld-linux")),
                "{files:?}"
            );
        }
        assert_eq!(content_tag(&files).unwrap(), content_tag(&files).unwrap());
        assert_eq!(
            path_in_image(Path::new("/x/target/horde-demo-job")),
            "/horde-demo-job"
        );
    }
}
