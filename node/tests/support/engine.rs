//! Shared by the container runner's tests (`container.rs`, `container_faults.rs`): the test
//! image (a rootfs holding a statically linked busybox, imported into the engine), the runner,
//! the job's launch, and checks that nothing of a job is left in the engine.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{CreateImageOptions, ListContainersOptions};
use futures::StreamExt as _;
use horde_node::server::executor::runner::container::{ContainerConfig, ContainerRunner};
use horde_node::server::executor::runner::{
    ClassPolicy, JobExit, JobProcess, Launch, NetworkPolicy, Runner, RunnerError, Runtime,
};
use horde_protocol::{JobId, Program};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The test image: busybox and nothing else.
pub(crate) const IMAGE: &str = "horde-test-job:1";
/// The port jobs listen on inside their namespace.
pub(crate) const JOB_PORT: u16 = 8080;
/// How long a job may take to open its port.
pub(crate) const READY_WITHIN: Duration = Duration::from_secs(10);

pub(crate) fn engine_address() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

pub(crate) fn docker() -> Docker {
    let address = engine_address();
    Docker::connect_with_unix(&address, 60, bollard::API_DEFAULT_VERSION)
        .unwrap_or_else(|error| panic!("no container engine at {address}: {error}"))
}

pub(crate) async fn negotiated() -> Docker {
    docker().negotiate_version().await.unwrap_or_else(|error| {
        panic!(
            "these tests need a container engine (Docker Engine or `podman system service`) at \
             {} (set DOCKER_HOST): {error}",
            engine_address()
        )
    })
}

/// A tar of a rootfs holding busybox (static) and a link per applet, plus `extra` files.
pub(crate) fn rootfs_tar(dir: &Path, extra: &[(&str, &str)]) -> Vec<u8> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .expect("a static busybox on the host (Debian: apt-get install busybox-static)");
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    for sub in [
        "tmp",
        "horde/volume",
        "horde/output",
        "proc",
        "dev",
        "sys",
        "etc",
    ] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
    for (path, content) in extra {
        std::fs::write(root.join(path), content).unwrap();
    }
    let tar = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(tar.status.success());
    tar.stdout
}

/// Imports a rootfs tarball as `name` (`docker import`); returns the image id.
pub(crate) async fn import(docker: &Docker, name: &str, tar: Vec<u8>) -> String {
    import_with(docker, name, tar, Vec::new()).await
}

/// [`import`] with Dockerfile instructions applied to the image (`docker import --change`).
pub(crate) async fn import_with(
    docker: &Docker,
    name: &str,
    tar: Vec<u8>,
    changes: Vec<String>,
) -> String {
    // The tag rides in `repo` (`name:tag`): Docker Engine accepts both forms, Podman's
    // compatible service only this one (it drops a separate `tag`).
    let options = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(name.into()),
        changes,
        ..CreateImageOptions::default()
    };
    let mut progress =
        docker.create_image(Some(options), Some(bollard::body_full(tar.into())), None);
    while let Some(step) = progress.next().await {
        step.unwrap();
    }
    docker.inspect_image(name).await.unwrap().id.unwrap()
}

/// The image `name` as an archive in the engine's `save` format.
pub(crate) async fn save(docker: &Docker, name: &str) -> Vec<u8> {
    let mut saved = Vec::new();
    let mut export = docker.export_image(name);
    while let Some(chunk) = export.next().await {
        saved.extend_from_slice(&chunk.unwrap());
    }
    saved
}

/// The test image's id, built once per test binary.
pub(crate) fn test_image() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let docker = negotiated().await;
                // Built by an earlier run: the same host busybox, so the same image.
                if let Ok(Some(id)) = docker.inspect_image(IMAGE).await.map(|image| image.id) {
                    return id;
                }
                let dir = tempfile::tempdir().unwrap();
                import(&docker, IMAGE, rootfs_tar(dir.path(), &[])).await
            })
        })
        .join()
        .unwrap()
    })
}

pub(crate) async fn runner() -> ContainerRunner {
    test_image();
    let config = ContainerConfig {
        engine: None,
        guard_program: PathBuf::from(env!("CARGO_BIN_EXE_horde")),
    };
    ContainerRunner::start(config)
        .await
        .unwrap_or_else(|error| {
            panic!("these tests need a container engine (set DOCKER_HOST): {error}")
        })
}

pub(crate) fn policy() -> ClassPolicy {
    ClassPolicy {
        runtime: Runtime::Container,
        network: NetworkPolicy::None,
        memory_bytes: Some(256 << 20),
        cpus: Some(1.0),
        pids: Some(128),
        tmp_bytes: None,
        output_bytes: None,
        disk_bytes: None,
        gpus: None,
        uid: None,
        allow_unisolated: false,
    }
}

/// A job directory with `volume/in.txt`.
pub(crate) fn job_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("volume")).unwrap();
    std::fs::write(dir.path().join("volume/in.txt"), "volume says hi\n").unwrap();
    dir
}

pub(crate) fn launch(dir: &Path, program: Program, script: &str, policy: ClassPolicy) -> Launch {
    Launch {
        job_id: JobId::random(),
        program,
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: Vec::new(),
        job_dir: dir.to_owned(),
        port: JOB_PORT,
        policy,
    }
}

pub(crate) fn image_program() -> Program {
    Program::Image {
        reference: IMAGE.into(),
    }
}

/// Containers labelled with `job`'s id, in any state.
pub(crate) async fn containers_of(job: JobId) -> Vec<String> {
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_owned(),
            vec![format!("horde.job={job}")],
        )])),
        ..ListContainersOptions::default()
    };
    negotiated()
        .await
        .list_containers(Some(options))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|container| container.id)
        .collect()
}

/// Polls the job's port until it accepts a connection.
pub(crate) async fn until_ready(job: &dyn JobProcess) -> Duration {
    let started = Instant::now();
    let dialer = job.dialer();
    loop {
        if dialer.connect().await.is_ok() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < READY_WITHIN,
            "the job's port never opened"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// An HTTP GET of `path` through the job's dialer; the whole response.
pub(crate) async fn http_get(job: &dyn JobProcess, path: &str) -> String {
    let mut stream = job.dialer().connect().await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: job\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Whether a host process has `marker` in its command line.
pub(crate) fn host_process_with(marker: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
            .unwrap_or(false)
    })
}

/// Runs a short job to its end: a typed [`RunnerError::ExitedAtOnce`] when it ended before the
/// runner could reach it, else its exit. Checks that nothing is left either way.
pub(crate) async fn run_to_exit(runner: &ContainerRunner, launch: Launch) -> JobExit {
    let id = launch.job_id;
    let exit = match runner.start(launch).await {
        Err(RunnerError::ExitedAtOnce(exit)) => exit,
        Ok(mut job) => {
            let exit = tokio::time::timeout(Duration::from_secs(10), job.wait())
                .await
                .unwrap()
                .unwrap();
            job.remove().await;
            exit
        }
        Err(error) => panic!("{error}"),
    };
    assert_eq!(containers_of(id).await, Vec::<String>::new(), "left behind");
    exit
}

pub(crate) async fn remove(job: Box<dyn JobProcess>, id: JobId) {
    job.remove().await;
    assert_eq!(containers_of(id).await, Vec::<String>::new(), "left behind");
}
